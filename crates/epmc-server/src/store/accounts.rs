//! Accounts of people (the portal logs in against them): an admin, or a user of one tenant.
//!
//! Passwords are generated here, shown once to the operator and stored only as an argon2id
//! PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) with a 16-byte salt from the operating
//! system's CSPRNG (`getrandom`). Nothing here logs or stores a password in clear;
//! [`GeneratedPassword`] does not show it in `Debug`.

use std::fmt;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use sqlx::Row;

use super::types::{tenant_id, ts};
use super::{Store, StoreError, TenantId, now_unix};
use epmc_proto::bounded::Timestamp;

/// The name [`AccountsHandle::create_first_admin`] gives the first admin.
pub const FIRST_ADMIN: &str = "admin";

/// What an account may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountRole {
    /// Everything (every tenant, operator commands).
    Admin,
    /// A user of one tenant: that tenant's devices and orders only.
    Tenant(TenantId),
}

/// An account as stored (without its password hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Its unique name.
    pub name: String,
    /// Its role.
    pub role: AccountRole,
    /// When it was created.
    pub created_at: Timestamp,
    /// When its password was last set.
    pub password_changed_at: Timestamp,
}

/// A password this module generated: shown to the operator once, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedPassword(String);

impl GeneratedPassword {
    /// The alphabet: lowercase letters and digits without the look-alikes `l`, `o`, `0`, `1`.
    /// 32 symbols, so one random byte gives one symbol without bias (`byte % 32`).
    const ALPHABET: &'static [u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
    /// 24 symbols of 5 bits: 120 bits.
    const LEN: usize = 24;

    fn generate() -> Result<GeneratedPassword, StoreError> {
        let mut bytes = [0u8; Self::LEN];
        getrandom::fill(&mut bytes).map_err(|e| StoreError::Crypto(e.to_string()))?;
        Ok(GeneratedPassword(
            bytes
                .iter()
                .map(|b| char::from(Self::ALPHABET[usize::from(b % 32)]))
                .collect(),
        ))
    }

    /// The password, to print once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for GeneratedPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GeneratedPassword(***)")
    }
}

/// The handle for accounts: create, list, set a password, verify a login.
#[derive(Clone, Debug)]
pub struct AccountsHandle {
    store: Store,
}

impl AccountsHandle {
    pub(super) fn new(store: Store) -> AccountsHandle {
        AccountsHandle { store }
    }

    /// Creates an account with a generated password, returned once.
    /// [`StoreError::Conflict`] when the name is taken, [`StoreError::NotFound`] for an
    /// unknown tenant.
    pub async fn create(
        &self,
        name: &str,
        role: AccountRole,
    ) -> Result<GeneratedPassword, StoreError> {
        check_name(name)?;
        let password = GeneratedPassword::generate()?;
        let hash = hash(&password).await?;
        let mut conn = self.store.pool().acquire().await?;
        insert(&mut conn, name, role, &hash).await?;
        tracing::info!(account = name, role = role_str(role), "account created");
        Ok(password)
    }

    /// Creates the admin account [`FIRST_ADMIN`] with a generated password when there is no
    /// account at all; `Ok(None)` (and nothing changed) when there is one.
    pub async fn create_first_admin(&self) -> Result<Option<GeneratedPassword>, StoreError> {
        if self.any().await? {
            return Ok(None);
        }
        let password = GeneratedPassword::generate()?;
        let hash = hash(&password).await?;
        let mut tx = self.store.begin_write().await?;
        // Checked again under the write lock (SQLite); on PostgreSQL two concurrent inits meet
        // on the name's primary key instead.
        let exists: i64 = sqlx::query("SELECT COUNT(*) FROM accounts")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if exists > 0 {
            return Ok(None);
        }
        match insert(&mut tx, FIRST_ADMIN, AccountRole::Admin, &hash).await {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => return Ok(None),
            Err(e) => return Err(e),
        }
        tx.commit().await?;
        tracing::info!(account = FIRST_ADMIN, "first admin account created");
        Ok(Some(password))
    }

    /// Whether any account exists.
    pub async fn any(&self) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM accounts")
            .fetch_one(self.store.pool())
            .await?
            .try_get(0)?;
        Ok(n > 0)
    }

    /// Every account, by name.
    pub async fn list(&self) -> Result<Vec<Account>, StoreError> {
        sqlx::query(
            "SELECT name, role, tenant_id, created_at, password_changed_at FROM accounts \
             ORDER BY name",
        )
        .fetch_all(self.store.pool())
        .await?
        .iter()
        .map(account)
        .collect()
    }

    /// One account.
    pub async fn get(&self, name: &str) -> Result<Account, StoreError> {
        let row = sqlx::query(
            "SELECT name, role, tenant_id, created_at, password_changed_at FROM accounts \
             WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(self.store.pool())
        .await?
        .ok_or(StoreError::NotFound)?;
        account(&row)
    }

    /// Gives an account a new generated password, returned once; the old one stops working.
    pub async fn set_password(&self, name: &str) -> Result<GeneratedPassword, StoreError> {
        let password = GeneratedPassword::generate()?;
        let hash = hash(&password).await?;
        let r = sqlx::query(
            "UPDATE accounts SET password_hash = $2, password_changed_at = $3 WHERE name = $1",
        )
        .bind(name)
        .bind(hash)
        .bind(now_unix())
        .execute(self.store.pool())
        .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        tracing::info!(account = name, "account password changed");
        Ok(password)
    }

    /// The account when `password` is its password, `Ok(None)` otherwise (unknown name or
    /// wrong password, not told apart). The comparison is argon2's, in constant time; an
    /// unknown name costs one argon2 hash too, so timing does not tell names apart.
    pub async fn verify(&self, name: &str, password: &str) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query(
            "SELECT name, role, tenant_id, created_at, password_changed_at, password_hash \
             FROM accounts WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(self.store.pool())
        .await?;
        let (found, stored) = match &row {
            Some(r) => (Some(account(r)?), r.try_get::<String, _>(5)?),
            None => (None, String::new()),
        };
        let password = password.as_bytes().to_vec();
        let matches = tokio::task::spawn_blocking(move || {
            let argon2 = Argon2::default();
            if stored.is_empty() {
                // Spend what a real verification spends, then refuse.
                let _ = argon2.hash_password_with_salt(&password, &[0u8; 16]);
                return Ok(false);
            }
            match argon2.verify_password(&password, stored.as_str()) {
                Ok(()) => Ok(true),
                Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
                Err(e) => Err(StoreError::corrupt(format!(
                    "an account's password hash: {e}"
                ))),
            }
        })
        .await
        .map_err(|e| StoreError::Crypto(e.to_string()))??;
        Ok(if matches { found } else { None })
    }
}

fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "an account name has 1 to 64 characters: letters, digits, '.', '_', '-', '@'".into(),
        ))
    }
}

fn role_str(role: AccountRole) -> &'static str {
    match role {
        AccountRole::Admin => "admin",
        AccountRole::Tenant(_) => "tenant",
    }
}

/// The argon2id PHC string of `password` with a fresh 16-byte salt (off the async threads:
/// argon2 is slow on purpose).
async fn hash(password: &GeneratedPassword) -> Result<String, StoreError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| StoreError::Crypto(e.to_string()))?;
    let password = password.clone();
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password_with_salt(password.expose().as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| StoreError::Crypto(e.to_string()))
    })
    .await
    .map_err(|e| StoreError::Crypto(e.to_string()))?
}

async fn insert(
    conn: &mut sqlx::AnyConnection,
    name: &str,
    role: AccountRole,
    hash: &str,
) -> Result<(), StoreError> {
    let tenant = match role {
        AccountRole::Admin => None,
        AccountRole::Tenant(t) => Some(t.to_string()),
    };
    if let Some(t) = &tenant {
        sqlx::query("SELECT id FROM tenants WHERE id = $1")
            .bind(t.as_str())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(StoreError::NotFound)?;
    }
    let now = now_unix();
    let r = sqlx::query(
        "INSERT INTO accounts (name, role, tenant_id, password_hash, created_at, \
         password_changed_at) VALUES ($1, $2, $3, $4, $5, $5)",
    )
    .bind(name)
    .bind(role_str(role))
    .bind(tenant)
    .bind(hash)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::from);
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.is_unique_violation() => Err(StoreError::Conflict("account")),
        Err(e) => Err(e),
    }
}

fn account(r: &sqlx::any::AnyRow) -> Result<Account, StoreError> {
    let role: String = r.try_get(1)?;
    let tenant: Option<String> = r.try_get(2)?;
    let role = match (role.as_str(), tenant) {
        ("admin", None) => AccountRole::Admin,
        ("tenant", Some(t)) => AccountRole::Tenant(tenant_id(&t)?),
        (other, t) => {
            return Err(StoreError::corrupt(format!(
                "account role {other:?} with tenant {t:?}"
            )));
        }
    };
    Ok(Account {
        name: r.try_get(0)?,
        role,
        created_at: ts(r.try_get(3)?)?,
        password_changed_at: ts(r.try_get(4)?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::GeneratedPassword;

    #[test]
    fn generated_passwords_differ_use_the_alphabet_and_hide_in_debug() {
        let a = GeneratedPassword::generate().expect("password");
        let b = GeneratedPassword::generate().expect("password");
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), GeneratedPassword::LEN);
        assert!(
            a.expose()
                .bytes()
                .all(|c| GeneratedPassword::ALPHABET.contains(&c))
        );
        assert!(!format!("{a:?}").contains(a.expose()));
    }
}
