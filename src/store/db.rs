//! The two engines a state database can live in: a SQLite file (`database.path`, the default)
//! or a PostgreSQL database (`database.url`). The store's queries are written once: a query's
//! code is expanded for each engine's own driver ([`on_pool!`], [`on_tx!`]), and where the two
//! dialects differ the query picks its text by the engine (`pg`).

use sqlx::{PgPool, Postgres, Sqlite, SqlitePool};

/// The pool of one state database.
#[derive(Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A transaction on a state database.
pub enum Tx {
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

/// Runs `$body` with `$pool` bound to the engine's own pool and `$pg` telling the engine.
macro_rules! on_pool {
    ($db:expr, |$pool:ident, $pg:ident| $body:expr) => {
        match $db {
            $crate::store::db::Db::Sqlite($pool) => {
                #[allow(unused_variables)]
                let $pg = false;
                $body
            }
            $crate::store::db::Db::Postgres($pool) => {
                #[allow(unused_variables)]
                let $pg = true;
                $body
            }
        }
    };
}

/// Runs `$body` with `$conn` bound to the transaction's connection and `$pg` telling the engine.
macro_rules! on_tx {
    ($tx:expr, |$conn:ident, $pg:ident| $body:expr) => {
        match $tx {
            $crate::store::db::Tx::Sqlite(t) => {
                #[allow(unused_variables)]
                let $pg = false;
                let $conn = &mut **t;
                $body
            }
            $crate::store::db::Tx::Postgres(t) => {
                #[allow(unused_variables)]
                let $pg = true;
                let $conn = &mut **t;
                $body
            }
        }
    };
}

pub(crate) use {on_pool, on_tx};

impl Db {
    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    /// A transaction that may read before it writes: in SQLite it takes the write lock at once
    /// (a deferred one could not upgrade once another connection committed: SQLITE_BUSY, no
    /// busy wait); PostgreSQL's row locks need nothing more.
    pub async fn begin_immediate(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            Db::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
            Db::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    pub async fn close(&self) {
        on_pool!(self, |pool, pg| pool.close().await)
    }
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
    }
}
