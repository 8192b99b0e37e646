//! Running one SQL text on SQLite or PostgreSQL: what lets the two stores share their statements
//! (`sql_store.rs`) instead of keeping a copy each.
//!
//! A shared statement is written with SQLite's numbered parameters (`?1`); [`numbered`] turns
//! them into PostgreSQL's (`$1`). Its arguments are [`Arg`]s and its rows are read through
//! [`Cols`], so that the code around a statement names no database: sqlx's bounds for binding
//! and reading those types are stated once, on [`Db`]'s and [`Cols`]'s blanket impls, rather
//! than on every function. Items are `pub` where the public `Store` impl over them requires it;
//! the module is private, so they are not part of the crate's API.

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgQueryResult, Postgres};
use sqlx::query::Query;
use sqlx::sqlite::{Sqlite, SqliteQueryResult};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use crate::storage::UsageKey;

/// A value bound to a statement's parameter: the types the shared statements bind.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(&'a str),
    OptText(Option<&'a str>),
    Bytes(&'a [u8]),
}

/// What differs between the two databases for a statement both run.
pub trait Dialect: Database {
    /// What starts a numbered parameter: `?` (`?1`) or `$` (`$1`).
    const PARAM: char;
    /// sqlx has no database-independent way to ask.
    fn rows_affected(r: &Self::QueryResult) -> u64;
}

impl Dialect for Sqlite {
    const PARAM: char = '?';
    fn rows_affected(r: &SqliteQueryResult) -> u64 {
        r.rows_affected()
    }
}

impl Dialect for Postgres {
    const PARAM: char = '$';
    fn rows_affected(r: &PgQueryResult) -> u64 {
        r.rows_affected()
    }
}

/// `sql` with its numbered parameters in the dialect's form: `?N` becomes `$N` for PostgreSQL.
/// A `?` not followed by a digit is left alone; one in a string literal would not be, so the
/// shared statements keep `?` out of their literals.
pub(crate) fn numbered(sql: &str, param: char) -> Cow<'_, str> {
    if param == '?' {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        let before_digit = chars.peek().is_some_and(|n| n.is_ascii_digit());
        out.push(if c == '?' && before_digit { param } else { c });
    }
    Cow::Owned(out)
}

/// A database the shared statements run on; implemented for every [`Dialect`] for which sqlx
/// can bind the [`Arg`] types and run statements on a connection (SQLite and PostgreSQL). Rows
/// come back as the database's own, read through [`Cols`].
pub trait Db: Dialect<Row: Cols> {
    /// `sql` (already [`numbered`]) with `args` bound in order.
    fn query<'q>(sql: &'q str, args: &[Arg<'q>]) -> Query<'q, Self, Self::Arguments<'q>>;
    /// Runs `sql` on `conn` (a pool's, or an open transaction's); rows affected.
    fn execute<'e>(
        conn: &'e mut Self::Connection,
        sql: &'e str,
        args: &'e [Arg<'e>],
    ) -> BoxFuture<'e, Result<u64, sqlx::Error>>;
    /// Runs `sql` on `conn`; every row it returns.
    fn fetch_all<'e>(
        conn: &'e mut Self::Connection,
        sql: &'e str,
        args: &'e [Arg<'e>],
    ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>>;
}

impl<DB> Db for DB
where
    DB: Dialect<Row: Cols>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    i64: Type<DB> + for<'q> Encode<'q, DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    str: Type<DB>,
    for<'q> &'q str: Encode<'q, DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    [u8]: Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB>,
{
    fn query<'q>(sql: &'q str, args: &[Arg<'q>]) -> Query<'q, DB, DB::Arguments<'q>> {
        args.iter().fold(sqlx::query(sql), |q, arg| match *arg {
            Arg::Int(v) => q.bind(v),
            Arg::OptInt(v) => q.bind(v),
            Arg::Text(v) => q.bind(v),
            Arg::OptText(v) => q.bind(v),
            Arg::Bytes(v) => q.bind(v),
        })
    }

    fn execute<'e>(
        conn: &'e mut DB::Connection,
        sql: &'e str,
        args: &'e [Arg<'e>],
    ) -> BoxFuture<'e, Result<u64, sqlx::Error>> {
        Box::pin(async move {
            let sql = numbered(sql, DB::PARAM);
            let done = conn.execute(DB::query(&sql, args)).await?;
            Ok(DB::rows_affected(&done))
        })
    }

    fn fetch_all<'e>(
        conn: &'e mut DB::Connection,
        sql: &'e str,
        args: &'e [Arg<'e>],
    ) -> BoxFuture<'e, Result<Vec<DB::Row>, sqlx::Error>> {
        Box::pin(async move {
            let sql = numbered(sql, DB::PARAM);
            conn.fetch_all(DB::query(&sql, args)).await
        })
    }
}

/// A row's columns, by name, as the types the schema keeps (integers, text, blobs).
pub trait Cols {
    fn int(&self, col: &str) -> Result<i64, sqlx::Error>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
    fn text(&self, col: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>, sqlx::Error>;
}

impl<R> Cols for R
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    i64: Type<R::Database> + for<'r> Decode<'r, R::Database>,
    String: Type<R::Database> + for<'r> Decode<'r, R::Database>,
    Vec<u8>: Type<R::Database> + for<'r> Decode<'r, R::Database>,
{
    fn int(&self, col: &str) -> Result<i64, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(col)
    }
    fn text(&self, col: &str) -> Result<String, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(col)
    }
    fn bytes(&self, col: &str) -> Result<Vec<u8>, sqlx::Error> {
        self.try_get(col)
    }
}

/// Settled usage grouped by `group_by`, in SQL that SQLite and PostgreSQL both run: columns
/// `tenant`, `key_prefix`, `model`, `day` (NULL where not grouped by), `requests`, `p`, `c`,
/// `cost`. Sums are cast back to BIGINT (PostgreSQL's SUM of BIGINT is NUMERIC).
pub(crate) fn usage_sql(group_by: &[UsageKey]) -> String {
    let mut cols = vec![];
    for g in group_by {
        let col = match g {
            UsageKey::Tenant => "tenant",
            UsageKey::Key => "key_prefix",
            UsageKey::Model => "model",
            UsageKey::Day => "day",
            UsageKey::Backend => "backend",
        };
        if !cols.contains(&col) {
            cols.push(col);
        }
    }
    let select = |c: &str| {
        if cols.contains(&c) {
            c.to_string()
        } else {
            format!("CAST(NULL AS TEXT) AS {c}")
        }
    };
    let group = if cols.is_empty() {
        String::new()
    } else {
        format!("GROUP BY {0} ORDER BY {0}", cols.join(", "))
    };
    // Column names come from the fixed list above, never from the caller.
    format!(
        "SELECT {}, {}, {}, {}, {}, COUNT(*) AS requests,
                CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS p,
                CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS c,
                CAST(COALESCE(SUM(cost_nusd), 0) AS BIGINT) AS cost
         FROM usage {group}",
        select("tenant"),
        select("key_prefix"),
        select("model"),
        select("day"),
        select("backend"),
    )
}

/// A migrator over an in-code list of (version, name, SQL); a version, once released, never
/// changes (sqlx checks its checksum).
pub(crate) fn migrator(list: &'static [(i64, &'static str, &'static str)]) -> Migrator {
    let migrations = list
        .iter()
        .map(|&(version, name, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(name),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

/// Adds a hold to its budget window if it still fits there, checked against the row itself:
/// both stores' guard behind the budget rule (`budget::hold`), which they check first against
/// what they read. Parameters: budget id, window, amount, the budget's limit. Written as
/// `<= limit - amount` so that nothing overflows (the rule refused any amount past the limit).
pub(crate) const HOLD_SQL: &str =
    "INSERT INTO budget_usage (budget_id, period_key, reserved) VALUES (?1, ?2, ?3)
     ON CONFLICT (budget_id, period_key) DO UPDATE
     SET reserved = budget_usage.reserved + excluded.reserved
     WHERE budget_usage.spent + budget_usage.reserved <= ?4 - excluded.reserved";

/// A key's allowed models as stored (a JSON array, NULL for all).
pub(crate) fn parse_models(s: Option<String>) -> Option<Vec<String>> {
    s.and_then(|s| serde_json::from_str(&s).ok())
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn numbered_parameters_take_the_dialects_form() {
        let sql = "SELECT a FROM t WHERE b = ?1 AND (?2 = 0 OR c = ?2) AND d = ?10";
        assert_eq!(numbered(sql, '?'), sql);
        assert_eq!(
            numbered(sql, '$'),
            "SELECT a FROM t WHERE b = $1 AND ($2 = 0 OR c = $2) AND d = $10"
        );
        // A lone `?` (not a parameter) and text without parameters are kept.
        assert_eq!(numbered("SELECT '?' , ? x", '$'), "SELECT '?' , ? x");
        assert_eq!(numbered("SELECT 1", '$'), "SELECT 1");
    }
}
