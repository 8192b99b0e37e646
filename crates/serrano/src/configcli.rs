//! `serrano config`: check a routing config file, read the stored versions, and switch the
//! running server to another version.
//!
//! `check` needs nothing but the file. `history`, `show` and `diff` read the governance database
//! (like `serrano admin`). `apply` and `rollback` change what a running server routes by, so
//! they ask that server over HTTP with an admin key.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serrano_router::Config;

use crate::govcli::{print_json, with_gov, DbArgs};

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file: every error names its line and field. Exit status 1 if invalid.
    Check { file: PathBuf },
    /// List the stored versions and every switch between them (newest last).
    History {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Print a stored version's text.
    Show {
        version: u64,
        #[command(flatten)]
        db: DbArgs,
    },
    /// A unified diff of two stored versions.
    Diff {
        from: u64,
        to: u64,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Send a config file to the running server, which validates, stores and applies it.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        server: ServerConn,
    },
    /// Switch the running server back to a stored version (in-flight requests finish as routed).
    Rollback {
        version: u64,
        #[command(flatten)]
        server: ServerConn,
    },
}

#[derive(Args)]
pub struct ServerConn {
    /// The running server.
    #[arg(long, env = "SERRANO_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An admin key of that server.
    #[arg(long, env = "SERRANO_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
}

pub fn run(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Check { file } => check(&file),
        ConfigCommand::History { db } => with_gov(&db, async |gov| {
            let versions = gov.config_versions().await?;
            let events = gov.config_events().await?;
            print_json(&serde_json::json!({"versions": versions, "events": events}))
        }),
        ConfigCommand::Show { version, db } => with_gov(&db, async |gov| {
            print!(
                "{}",
                gov.config_version(version)
                    .await?
                    .source
                    .unwrap_or_default()
            );
            Ok(())
        }),
        ConfigCommand::Diff { from, to, db } => with_gov(&db, async |gov| {
            let a = gov.config_version(from).await?.source.unwrap_or_default();
            let b = gov.config_version(to).await?.source.unwrap_or_default();
            print!(
                "{}",
                serrano_router::config::diff(
                    &a,
                    &b,
                    &format!("version {from}"),
                    &format!("version {to}")
                )
            );
            Ok(())
        }),
        ConfigCommand::Apply { file, server } => {
            let text = read(&file)?;
            post(&server, "/admin/v1/config", "text/plain", text)
        }
        ConfigCommand::Rollback { version, server } => post(
            &server,
            "/admin/v1/config/rollback",
            "application/json",
            serde_json::json!({ "version": version }).to_string(),
        ),
    }
}

fn read(file: &PathBuf) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

fn check(file: &PathBuf) -> Result<()> {
    let text = read(file)?;
    let config = match Config::parse(&text) {
        Ok(c) => c,
        Err(e) => bail!("{}: {e}", file.display()),
    };
    for var in config.missing_secrets() {
        eprintln!("warning: ${var} is not set here; the server needs it in its environment");
    }
    check_sim_tiers(&config).with_context(|| format!("{}", file.display()))?;
    println!(
        "{}: ok ({} backends, {} routes, {} tenants; sha256 {})",
        file.display(),
        config.backends.len(),
        config.routes.len(),
        config.tenants.len(),
        &config.hash[..12]
    );
    Ok(())
}

/// Each sim backend's device as the server will build it: the catalog's device or what-if
/// variant, `model_shape` and precision, or the profile file (relative to this directory, as
/// the server reads it). Whether the weights fit the device is known only with the served
/// model, when the server starts.
fn check_sim_tiers(config: &Config) -> Result<()> {
    let catalog = serrano_sim::Catalog::builtin()?;
    for b in &config.backends {
        let Some(tier) = &b.sim else { continue };
        // A stand-in for the served model's shape: only the names are checked here.
        let mut shape = || {
            catalog
                .model("smollm2-135m")
                .map(serrano_sim::ModelShape::from_spec)
                .map_err(|e| e.to_string())
        };
        serrano_sim::fleet::tier_backend(tier, &catalog, &mut shape, std::path::Path::new("."))
            .map_err(|e| anyhow::anyhow!("backend '{}': sim: {e}", b.name))?;
    }
    Ok(())
}

fn post(server: &ServerConn, path: &str, content_type: &str, body: String) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let url = format!("{}{path}", server.url.trim_end_matches('/'));
        let resp = reqwest::Client::new()
            .post(&url)
            .bearer_auth(&server.admin_key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{status}: {}",
                v["error"]["message"].as_str().unwrap_or("no message")
            );
        }
        println!("active config version: {}", v["version"]);
        Ok(())
    })
}
