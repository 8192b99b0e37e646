//! Versions of the routing config: each distinct text applied is stored once, immutable, under
//! the next number; each switch a process makes (apply, reload, rollback) is an event.

use serde::Serialize;
use sqlx::Row;

use crate::error::GovError;
use crate::store::Governance;
use crate::time::now_ms;

#[derive(Debug, Clone, Serialize)]
pub struct ConfigVersion {
    pub version: u64,
    pub hash: String,
    pub created_ms: i64,
    pub author: String,
    /// The TOML text (left out of listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigEvent {
    pub version: u64,
    pub time_ms: i64,
    pub author: String,
    pub action: String,
}

fn version_of(r: &sqlx::sqlite::SqliteRow, with_source: bool) -> Result<ConfigVersion, GovError> {
    Ok(ConfigVersion {
        version: r.try_get::<i64, _>("version")? as u64,
        hash: r.try_get("hash")?,
        created_ms: r.try_get("created_ms")?,
        author: r.try_get("author")?,
        source: if with_source {
            Some(r.try_get("source")?)
        } else {
            None
        },
    })
}

impl Governance {
    /// Stores a config text (once per distinct text) and records that `author` switched to it;
    /// returns its version.
    pub async fn record_config(
        &self,
        hash: &str,
        source: &str,
        author: &str,
        action: &str,
    ) -> Result<u64, GovError> {
        let mut tx = self.pool().begin().await?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO config_versions (hash, created_ms, author, source) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(hash)
        .bind(now)
        .bind(author)
        .bind(source)
        .execute(&mut *tx)
        .await?;
        let version: i64 = sqlx::query("SELECT version FROM config_versions WHERE hash = ?1")
            .bind(hash)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        sqlx::query(
            "INSERT INTO config_events (version, time_ms, author, action) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(version)
        .bind(now)
        .bind(author)
        .bind(action)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(version as u64)
    }

    pub async fn config_versions(&self) -> Result<Vec<ConfigVersion>, GovError> {
        sqlx::query(
            "SELECT version, hash, created_ms, author FROM config_versions ORDER BY version",
        )
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| version_of(r, false))
        .collect()
    }

    pub async fn config_events(&self) -> Result<Vec<ConfigEvent>, GovError> {
        sqlx::query("SELECT version, time_ms, author, action FROM config_events ORDER BY id")
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(|r| {
                Ok(ConfigEvent {
                    version: r.try_get::<i64, _>(0)? as u64,
                    time_ms: r.try_get(1)?,
                    author: r.try_get(2)?,
                    action: r.try_get(3)?,
                })
            })
            .collect()
    }

    pub async fn config_version(&self, version: u64) -> Result<ConfigVersion, GovError> {
        let r = sqlx::query(
            "SELECT version, hash, created_ms, author, source FROM config_versions WHERE version = ?1",
        )
        .bind(i64::try_from(version).unwrap_or(i64::MAX))
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| GovError::NotFound(format!("config version {version}")))?;
        version_of(&r, true)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{GovConfig, Governance};

    #[tokio::test]
    async fn a_text_is_one_version_however_often_applied() {
        let dir = tempfile::tempdir().unwrap();
        let gov = Governance::open(GovConfig::new(dir.path().join("g.db")))
            .await
            .unwrap();
        assert_eq!(
            gov.record_config("h1", "a = 1", "startup", "apply")
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            gov.record_config("h2", "a = 2", "sk-srn-ab", "apply")
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            gov.record_config("h1", "a = 1", "sk-srn-ab", "rollback")
                .await
                .unwrap(),
            1
        );
        assert_eq!(gov.config_versions().await.unwrap().len(), 2);
        let events = gov.config_events().await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.version).collect::<Vec<_>>(),
            [1, 2, 1]
        );
        assert_eq!(events[2].action, "rollback");
        assert_eq!(
            gov.config_version(2).await.unwrap().source.as_deref(),
            Some("a = 2")
        );
        assert!(gov.config_version(3).await.is_err());
    }
}
