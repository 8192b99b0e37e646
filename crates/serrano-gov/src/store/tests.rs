//! Verification read in pages: the same report as one pass over the whole chain, with
//! tampering and truncation found in any page.

use super::*;
use crate::ticket::Ticket;

/// Records in the test chain: six pages and a bit of [`PAGE`].
const RECORDS: i64 = 25;
/// A page far smaller than the chain, so that verification crosses many page boundaries.
const PAGE: i64 = 4;

struct Fixture {
    _dir: tempfile::TempDir,
    gov: Governance,
    db: sqlx::SqlitePool,
}

async fn chain_of(n: i64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gov.db");
    let gov = Governance::open(GovConfig::new(path.clone()))
        .await
        .unwrap();
    for i in 0..n {
        let t = Ticket::new(&gov, format!("r{i}"), "POST", "/v1/completions");
        t.finish(200, None).await.unwrap();
    }
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    Fixture { _dir: dir, gov, db }
}

impl Fixture {
    /// The report in small pages, after checking it equals the one read in a single page.
    async fn verify(&self, trusted: Option<&VerifyingKey>, extra: &[Checkpoint]) -> VerifyReport {
        let paged = self
            .gov
            .verify_audit_paged(trusted, extra, PAGE)
            .await
            .unwrap();
        let whole = self
            .gov
            .verify_audit_paged(trusted, extra, RECORDS * 10)
            .await
            .unwrap();
        assert_eq!(paged, whole, "pages change the report");
        paged
    }

    async fn record(&self, seq: i64) -> (String, String) {
        sqlx::query_as("SELECT record, hash FROM audit_log WHERE seq = ?1")
            .bind(seq)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    async fn set_record(&self, seq: i64, record: &str) {
        sqlx::query("UPDATE audit_log SET record = ?2 WHERE seq = ?1")
            .bind(seq)
            .bind(record)
            .execute(&self.db)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn an_intact_chain_verifies_across_pages_with_its_checkpoints() {
    let f = chain_of(RECORDS).await;
    let (key, _) = crate::generate_signing_key();
    // A checkpoint inside an early page and one at the head.
    let (_, hash5) = f.record(5).await;
    assert!(f
        .gov
        .store()
        .insert_checkpoint(&Checkpoint::sign(&key, 5, &hash5, now_ms()))
        .await
        .unwrap());
    f.gov.checkpoint(&key).await.unwrap().unwrap();
    let r = f.verify(Some(&key.verifying_key()), &[]).await;
    assert!(r.ok, "{r:?}");
    assert_eq!((r.records, r.checkpoints), (RECORDS as u64, 2));
    assert_eq!(r.head_hash, f.record(RECORDS).await.1);
    assert_eq!(
        r,
        f.gov
            .verify_audit_with(Some(&key.verifying_key()), &[])
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn tampering_in_a_later_page_is_found() {
    let f = chain_of(RECORDS).await;
    let (text, _) = f.record(22).await;
    f.set_record(22, &text.replace("\"status\":200", "\"status\":201"))
        .await;
    let r = f.verify(None, &[]).await;
    assert!(!r.ok);
    assert_eq!(r.first_bad_seq, Some(22));
    assert_eq!(r.records, RECORDS as u64, "every stored row is counted");
    assert_eq!(r.reason.as_deref(), Some("content does not match its hash"));

    // Put back, the chain holds again; a checkpoint in a later page signed over other
    // content does not.
    f.set_record(22, &text).await;
    assert!(f.verify(None, &[]).await.ok);
    let (key, _) = crate::generate_signing_key();
    let forged = Checkpoint::sign(&key, 18, &"ab".repeat(32), now_ms());
    let r = f.verify(None, &[forged]).await;
    assert!(!r.ok);
    assert_eq!(r.first_bad_seq, Some(18));
}

#[tokio::test]
async fn truncation_is_found() {
    let f = chain_of(RECORDS).await;
    let (key, _) = crate::generate_signing_key();
    let cp = f.gov.checkpoint(&key).await.unwrap().unwrap();
    sqlx::query("DELETE FROM audit_log WHERE seq > 23")
        .execute(&f.db)
        .await
        .unwrap();
    let r = f.verify(None, &[]).await;
    assert!(!r.ok);
    assert_eq!((r.records, r.first_bad_seq), (23, Some(24)));

    // The head rewritten to the new end: only the checkpoint at the old head catches it.
    let (_, hash) = f.record(23).await;
    sqlx::query("UPDATE audit_head SET seq = 23, hash = ?1")
        .bind(&hash)
        .execute(&f.db)
        .await
        .unwrap();
    let r = f.verify(None, &[cp]).await;
    assert!(!r.ok);
    assert_eq!(r.first_bad_seq, Some(RECORDS));
    assert!(r.reason.unwrap().contains("missing"));
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&f.db)
        .await
        .unwrap();
    assert!(
        f.verify(None, &[]).await.ok,
        "nothing else remembers the old end"
    );
}

#[tokio::test]
async fn an_empty_log_and_a_chain_of_exactly_one_page_verify() {
    let f = chain_of(0).await;
    let r = f.verify(None, &[]).await;
    assert!(r.ok && r.records == 0 && r.head_hash.is_empty(), "{r:?}");
    let f = chain_of(PAGE).await;
    let r = f.verify(None, &[]).await;
    assert!(r.ok && r.records == PAGE as u64, "{r:?}");
}
