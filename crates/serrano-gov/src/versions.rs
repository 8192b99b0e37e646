//! Versions of the routing config: each distinct text applied is stored once, immutable, under
//! the next number; each switch a process makes (apply, reload, rollback) is an event.

use crate::error::GovError;
use crate::store::Governance;
use crate::time::now_ms;
use crate::types::{ConfigEvent, ConfigVersion};

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
        self.store()
            .record_config(hash, source, author, action, now_ms())
            .await
    }

    pub async fn config_versions(&self) -> Result<Vec<ConfigVersion>, GovError> {
        self.store().config_versions().await
    }

    pub async fn config_events(&self) -> Result<Vec<ConfigEvent>, GovError> {
        self.store().config_events().await
    }

    pub async fn config_version(&self, version: u64) -> Result<ConfigVersion, GovError> {
        self.store()
            .config_version(version)
            .await?
            .ok_or_else(|| GovError::NotFound(format!("config version {version}")))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::GovConfig;
    use crate::store::Governance;

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
