//! Store errors.

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL names no supported database (the URL is shown without its password).
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    /// The database was written by a newer build: refusing to start rather than downgrade.
    #[error(
        "the database schema is version {found}, newer than version {supported} of this build: \
         refusing to start; run a newer epmc-server or restore a backup"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// No such object (or not visible to this handle).
    #[error("not found")]
    NotFound,
    /// The name is taken.
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// The enrollment token is unknown, already used or expired (not told apart, on purpose).
    #[error("enrollment token refused (unknown, used or expired)")]
    TokenRefused,
    /// A value read back from the database does not decode.
    #[error("stored data does not decode: {0}")]
    Corrupt(String),
    /// A caller passed an invalid value.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The random source or password hashing failed.
    #[error("password hashing or the random source failed: {0}")]
    Crypto(String),
}

impl StoreError {
    pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(what.to_string())
    }

    /// A unique-constraint violation.
    pub(crate) fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => e.is_unique_violation(),
            _ => false,
        }
    }
}
