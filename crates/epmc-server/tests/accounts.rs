//! `epmc-server init` creates the first admin account and prints its generated password once;
//! `account add|list|passwd`. The real binary, on a SQLite data directory and, when
//! `EPMC_TEST_POSTGRES_URL` is set, on a PostgreSQL database (a schema of its own).

mod pg;

use std::path::Path;
use std::process::{Command, Output};

use epmc_server::store::{AccountRole, FIRST_ADMIN, Store};

fn epmc(data: &Path, database: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_epmc-server"));
    command.arg("--data").arg(data);
    match database {
        Some(url) => command.env("EPMC_DATABASE", url),
        None => command.env_remove("EPMC_DATABASE"),
    };
    command.env("RUST_LOG", "debug").args(args);
    command.output().expect("run epmc-server")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8")
}

/// The password printed after "shown only now: " (the one line that has it).
fn printed_password(stdout: &str) -> String {
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("shown only now: "))
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let password = lines[0]
        .rsplit("shown only now: ")
        .next()
        .expect("password")
        .trim()
        .to_owned();
    assert!(password.len() >= 20, "{password:?}");
    password
}

async fn init_prints_a_password_once_and_accounts_work(database: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let db = database.as_deref();

    let out = epmc(&data, db, &["init"]);
    let first = stdout(&out);
    let password = printed_password(&first);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(&password), "the password is never logged");

    let open = || async {
        match db {
            Some(url) => Store::open(url).await,
            None => Store::open_data_dir(&data, Default::default()).await,
        }
        .expect("open store")
    };
    let store = open().await;
    let admin = store
        .accounts()
        .verify(FIRST_ADMIN, &password)
        .await
        .expect("verify")
        .expect("the printed password verifies");
    assert_eq!(admin.role, AccountRole::Admin);
    assert!(
        store
            .accounts()
            .verify(FIRST_ADMIN, "wrong password")
            .await
            .expect("verify")
            .is_none()
    );
    store.close().await;
    if db.is_none() {
        let file = std::fs::read(data.join("epmc.db")).expect("read db");
        assert!(
            !file
                .windows(password.len())
                .any(|w| w == password.as_bytes()),
            "no password in clear in the database file"
        );
    }

    // A second init changes nothing, says so and prints no password.
    let second = stdout(&epmc(&data, db, &["init"]));
    assert!(second.contains("nothing changed"), "{second}");
    assert!(second.contains("none created"), "{second}");
    assert!(!second.contains("shown only now"), "{second}");
    let store = open().await;
    assert_eq!(store.accounts().list().await.expect("list").len(), 1);
    assert!(
        store
            .accounts()
            .verify(FIRST_ADMIN, &password)
            .await
            .expect("verify")
            .is_some(),
        "the first password still works"
    );
    store.close().await;

    // account add / list / passwd.
    stdout(&epmc(&data, db, &["tenant", "add", "acme"]));
    let alice = printed_password(&stdout(&epmc(
        &data,
        db,
        &[
            "account", "add", "alice", "--role", "tenant", "--tenant", "acme",
        ],
    )));
    let refused = epmc(&data, db, &["account", "add", "bob", "--role", "tenant"]);
    assert!(!refused.status.success(), "--role tenant needs --tenant");
    let refused = epmc(&data, db, &["account", "add", "alice", "--role", "admin"]);
    assert!(!refused.status.success(), "the name is taken");
    let list = stdout(&epmc(&data, db, &["account", "list"]));
    let rows: Vec<Vec<&str>> = list.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(rows[0][..3], ["admin", "admin", "-"]);
    assert_eq!(rows[1][..3], ["alice", "tenant", "acme"]);
    assert!(!list.contains(&password) && !list.contains(&alice));

    let renewed = printed_password(&stdout(&epmc(&data, db, &["account", "passwd", "alice"])));
    assert_ne!(renewed, alice);
    assert!(
        !epmc(&data, db, &["account", "passwd", "nobody"])
            .status
            .success()
    );
    let store = open().await;
    let accounts = store.accounts();
    assert!(
        accounts
            .verify("alice", &alice)
            .await
            .expect("verify")
            .is_none()
    );
    assert!(
        accounts
            .verify("alice", &renewed)
            .await
            .expect("verify")
            .is_some()
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_and_account_commands_sqlite() {
    init_prints_a_password_once_and_accounts_work(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_and_account_commands_postgres() {
    if let Some(url) = pg::schema_url().await {
        init_prints_a_password_once_and_accounts_work(Some(url)).await;
    }
}
