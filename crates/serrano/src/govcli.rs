//! `serrano admin`, `serrano usage` and `serrano audit`: governance from the terminal, on the same
//! database the server uses (SQLite and PostgreSQL both allow that).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use serrano_gov::{
    BudgetPeriod, BudgetUnit, Changed, GovConfig, Governance, NewKey, Retention, Role, Target,
};

#[derive(Args, Clone)]
pub struct DbArgs {
    /// The governance database (tenants, keys, budgets, usage, audit): a SQLite file, or a
    /// PostgreSQL URL (postgres://user:password@host:5432/db) that gateway replicas share.
    /// Default: $SERRANO_HOME/serrano.db, else ~/.local/share/serrano/serrano.db.
    #[arg(long, env = "SERRANO_DB", global = true)]
    pub db: Option<PathBuf>,
}

impl DbArgs {
    pub fn path(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(serrano_gov::default_db_path)
    }

    /// The database as logs and errors may show it (a URL without its password).
    pub fn shown(&self) -> String {
        serrano_gov::display_db(&self.path().to_string_lossy())
    }
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Tenants: who requests are attributed and billed to.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API keys: secrets shown once, stored as hashes.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Token and money budgets per tenant or key, per day, month or in total.
    #[command(subcommand)]
    Budget(BudgetCommand),
    /// Rate limits per tenant or key: requests and tokens per minute, concurrent requests, MCP
    /// tool calls per minute and per day.
    #[command(subcommand)]
    Limit(LimitCommand),
    /// Prices per model and backend, in dollars per million tokens.
    #[command(subcommand)]
    Price(PriceCommand),
    /// The history of admin changes (API and CLI): who, what, before and after; roll a
    /// budget, limit, price or policy back to any version, or undo a change.
    #[command(subcommand)]
    Change(ChangeCommand),
}

#[derive(Subcommand)]
pub enum ChangeCommand {
    /// Changes, newest first, as JSON.
    List {
        /// Only this kind: policy, budget, limits, price, tenant, key, retention, content,
        /// config.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One change, as JSON.
    Show { id: i64 },
    /// Set again what change ID set (a new change).
    Rollback { id: i64 },
    /// Restore what change ID replaced (a new change).
    Undo { id: i64 },
    /// A unified diff between the values two changes set.
    Diff { from: i64, to: i64 },
}

#[derive(Subcommand)]
pub enum LimitCommand {
    /// Set (or replace) the limits of a tenant or key; an omitted kind is unlimited.
    Set {
        #[arg(long)]
        tenant: String,
        /// A key id, for per-key limits; default: the whole tenant.
        #[arg(long)]
        key: Option<i64>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<i64>,
        /// Tokens per minute (prompt plus max_tokens, counted at admission; unused ones refunded).
        #[arg(long)]
        tpm: Option<i64>,
        /// Requests in flight at once.
        #[arg(long)]
        max_concurrent: Option<i64>,
        /// MCP tool calls per minute (through /mcp or a server-side tool loop; each is also a
        /// request and a token against the limits above).
        #[arg(long)]
        tool_calls_per_minute: Option<i64>,
        /// MCP tool calls per UTC day.
        #[arg(long)]
        tool_calls_per_day: Option<i64>,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum TenantCommand {
    Create {
        name: String,
        /// How much prompt and completion content the audit log keeps: none, hash or full.
        #[arg(long, default_value = "none", value_parser = parse_retention)]
        retention: Retention,
    },
    /// Set a tenant's safety-filter policy (JSON; see README), or remove it with --clear.
    Policy {
        name: String,
        /// The policy, e.g. '{"pii": "redact", "injection": "block"}'.
        #[arg(long, conflicts_with = "clear")]
        json: Option<String>,
        #[arg(long)]
        clear: bool,
    },
    /// Change a tenant's content retention.
    Retention {
        name: String,
        #[arg(value_parser = parse_retention)]
        retention: Retention,
    },
    List,
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a key and print its secret (the only time it is shown).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        name: String,
        /// inference (default) or admin.
        #[arg(long, default_value = "inference", value_parser = parse_role)]
        role: Role,
        /// A model the key may use (repeatable); default: all.
        #[arg(long = "model")]
        models: Vec<String>,
        /// Let the key ask for the interactive latency class (header `x-serrano-slo-class:
        /// interactive`) though its tenant's class is batch.
        #[arg(long)]
        grant_interactive: bool,
        /// Days until the key stops working; default: never.
        #[arg(long)]
        expires_in_days: Option<f64>,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by id; its next request is refused.
    Revoke { id: i64 },
}

#[derive(Subcommand)]
pub enum BudgetCommand {
    /// Set (or replace) a budget.
    Set {
        #[arg(long)]
        tenant: String,
        /// A key id, for a per-key budget; default: the whole tenant.
        #[arg(long)]
        key: Option<i64>,
        /// tokens or usd.
        #[arg(long, value_parser = parse_unit)]
        unit: BudgetUnit,
        /// day, month or total.
        #[arg(long, value_parser = parse_period)]
        period: BudgetPeriod,
        /// Tokens, or dollars for --unit usd.
        #[arg(long)]
        limit: f64,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum PriceCommand {
    Set {
        #[arg(long)]
        model: String,
        #[arg(long, default_value = "local")]
        backend: String,
        /// Dollars per million prompt tokens.
        #[arg(long)]
        input: f64,
        /// Dollars per million completion tokens.
        #[arg(long)]
        output: f64,
    },
}

#[derive(Args)]
pub struct UsageArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Group by any of tenant, key, model, day, backend (comma-separated).
    #[arg(long, default_value = "tenant,model,day")]
    pub group_by: String,
    /// table, json or csv.
    #[arg(long, default_value = "table")]
    pub format: String,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and its signed checkpoints; exits non-zero and names the first bad
    /// record if they do not hold.
    Verify {
        /// Require checkpoints to be signed by this Ed25519 public key (hex).
        #[arg(long)]
        public_key: Option<String>,
        /// Also check these exported checkpoints (JSON lines from `serrano audit checkpoints`).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Create an Ed25519 signing key for checkpoints: the seed goes to FILE (mode 0600), the
    /// public key to stdout.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign the chain's current head with the key in FILE (`serve --audit-signing-key` does this
    /// periodically).
    Checkpoint {
        #[arg(long)]
        key: PathBuf,
    },
    /// Print every stored checkpoint as JSON lines, to keep outside this machine.
    Checkpoints,
    /// Write records as JSON lines (for a SIEM).
    Export {
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Output file; default: stdout.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Erase a tenant's stored prompts and completions (GDPR); the chain still verifies.
    Erase {
        #[arg(long)]
        tenant: String,
    },
}

fn parse_retention(s: &str) -> Result<Retention, String> {
    Retention::parse(s).ok_or_else(|| format!("'{s}': use none, hash or full"))
}
fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("'{s}': use inference or admin"))
}
fn parse_unit(s: &str) -> Result<BudgetUnit, String> {
    BudgetUnit::parse(s).ok_or_else(|| format!("'{s}': use tokens or usd"))
}
fn parse_period(s: &str) -> Result<BudgetPeriod, String> {
    BudgetPeriod::parse(s).ok_or_else(|| format!("'{s}': use day, month or total"))
}

/// Runs `f` against the database on a small runtime of its own.
pub fn with_gov<T>(db: &DbArgs, f: impl AsyncFnOnce(Governance) -> Result<T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let gov = Governance::open(GovConfig::new(db.path()))
            .await
            .with_context(|| format!("cannot open {}", db.shown()))?;
        f(gov).await
    })
}

pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Who a change made here is attributed to: the operating-system user and host.
pub fn cli_actor() -> String {
    let host = whoami::fallible::hostname().unwrap_or_else(|_| "unknown-host".into());
    format!("cli:{}@{host}", whoami::username())
}

/// Reports a change on stderr.
fn report(c: &Changed) {
    let seq = c.record.audit_seq.unwrap_or(0);
    eprintln!(
        "change {} ({} {}) by {}, audit record {seq}",
        c.record.id, c.record.action, c.record.kind, c.record.actor
    );
}

pub fn admin(db: &DbArgs, cmd: AdminCommand) -> Result<()> {
    let actor = cli_actor();
    let actor = actor.as_str();
    with_gov(db, async |gov| match cmd {
        AdminCommand::Tenant(TenantCommand::Create { name, retention }) => {
            let info = gov.create_tenant(&name, retention).await?;
            let after = json!({"retention": info.retention});
            gov.record_event(actor, "create", "tenant", json!({"tenant": name}), after)
                .await?;
            print_json(&info)
        }
        AdminCommand::Tenant(TenantCommand::Retention { name, retention }) => {
            gov.set_retention(&name, retention).await?;
            let after = json!({"retention": retention});
            gov.record_event(actor, "set", "retention", json!({"tenant": name}), after)
                .await?;
            Ok(())
        }
        AdminCommand::Tenant(TenantCommand::Policy { name, json, clear }) => {
            let policy: serde_json::Value = match (json, clear) {
                (Some(text), _) => serde_json::from_str(&text).context("--json")?,
                (None, true) => serde_json::Value::Null,
                (None, false) => bail!("give --json POLICY or --clear"),
            };
            let target = Target::Policy { tenant: name };
            report(&gov.change(actor, target, policy).await?);
            Ok(())
        }
        AdminCommand::Tenant(TenantCommand::List) => print_json(&gov.tenants().await?),
        AdminCommand::Key(KeyCommand::Create {
            tenant,
            name,
            role,
            models,
            grant_interactive,
            expires_in_days,
        }) => {
            let expires_ms =
                expires_in_days.map(|d| serrano_gov::now_ms() + (d * 86_400_000.0) as i64);
            let (info, secret) = gov
                .create_key(NewKey {
                    tenant,
                    name,
                    role: Some(role),
                    models: (!models.is_empty()).then_some(models),
                    grant_interactive,
                    expires_ms,
                })
                .await?;
            let target = json!({"tenant": info.tenant, "key_id": info.id});
            gov.record_event(actor, "create", "key", target, json!(info))
                .await?;
            eprintln!(
                "created key {} ({}) for tenant '{}'; the secret is shown only now:",
                info.id, info.prefix, info.tenant
            );
            println!("{secret}");
            Ok(())
        }
        AdminCommand::Key(KeyCommand::List { tenant }) => {
            print_json(&gov.keys(tenant.as_deref()).await?)
        }
        AdminCommand::Key(KeyCommand::Revoke { id }) => {
            gov.revoke_key(id).await?;
            let (target, after) = (json!({"key_id": id}), json!({"revoked": true}));
            gov.record_event(actor, "revoke", "key", target, after)
                .await?;
            eprintln!("revoked key {id}");
            Ok(())
        }
        AdminCommand::Budget(BudgetCommand::Set {
            tenant,
            key,
            unit,
            period,
            limit,
        }) => {
            let amount = serrano_server::budget_amount(unit, limit)?;
            let target = Target::Budget {
                tenant,
                key_id: key,
                unit,
                period,
            };
            report(&gov.change(actor, target, json!(amount)).await?);
            Ok(())
        }
        AdminCommand::Budget(BudgetCommand::List { tenant }) => {
            print_json(&gov.budgets(tenant.as_deref()).await?)
        }
        AdminCommand::Limit(LimitCommand::Set {
            tenant,
            key,
            rpm,
            tpm,
            max_concurrent,
            tool_calls_per_minute,
            tool_calls_per_day,
        }) => {
            let limits = serrano_gov::Limits {
                rpm,
                tpm,
                max_concurrent,
                tool_calls_per_minute,
                tool_calls_per_day,
            };
            let target = Target::Limits {
                tenant,
                key_id: key,
            };
            report(&gov.change(actor, target, json!(limits)).await?);
            Ok(())
        }
        AdminCommand::Limit(LimitCommand::List { tenant }) => {
            print_json(&gov.limits(tenant.as_deref()).await?)
        }
        AdminCommand::Price(PriceCommand::Set {
            model,
            backend,
            input,
            output,
        }) => {
            let value = serrano_gov::price_from_usd(input, output)?;
            let target = Target::Price { model, backend };
            report(&gov.change(actor, target, value).await?);
            Ok(())
        }
        AdminCommand::Change(cmd) => change(&gov, actor, cmd).await,
    })
}

async fn change(gov: &Governance, actor: &str, cmd: ChangeCommand) -> Result<()> {
    match cmd {
        ChangeCommand::List { kind, limit } => {
            print_json(&gov.changes(kind.as_deref(), None, limit).await?)
        }
        ChangeCommand::Show { id } => print_json(&gov.change_record(id).await?),
        ChangeCommand::Rollback { id } => {
            report(&gov.rollback_change(actor, id).await?);
            Ok(())
        }
        ChangeCommand::Undo { id } => {
            report(&gov.undo_change(actor, id).await?);
            Ok(())
        }
        ChangeCommand::Diff { from, to } => {
            print!("{}", serrano_server::change_diff(gov, from, to).await?);
            Ok(())
        }
    }
}

pub fn usage(a: UsageArgs) -> Result<()> {
    with_gov(&a.db, async |gov| {
        let fields: Vec<&str> = a
            .group_by
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let rows = gov.usage(&fields).await?;
        match a.format.as_str() {
            "json" => print_json(&rows),
            "csv" => {
                print!("{}", serrano_gov::usage_csv(&rows));
                Ok(())
            }
            "table" => {
                println!(
                    "{:<16} {:<16} {:<24} {:<10} {:<16} {:>9} {:>12} {:>12} {:>12}",
                    "tenant",
                    "key",
                    "model",
                    "day",
                    "backend",
                    "requests",
                    "prompt",
                    "completion",
                    "cost_usd"
                );
                let d = |s: &Option<String>| s.clone().unwrap_or_else(|| "*".into());
                for r in rows {
                    println!(
                        "{:<16} {:<16} {:<24} {:<10} {:<16} {:>9} {:>12} {:>12} {:>12.6}",
                        d(&r.tenant),
                        d(&r.key),
                        d(&r.model),
                        d(&r.day),
                        d(&r.backend),
                        r.requests,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.cost_usd
                    );
                }
                Ok(())
            }
            other => bail!("unknown format '{other}' (table, json or csv)"),
        }
    })
}

pub fn audit(db: &DbArgs, cmd: AuditCommand) -> Result<()> {
    with_gov(db, async |gov| match cmd {
        AuditCommand::Verify {
            public_key,
            checkpoints,
        } => {
            let trusted = public_key
                .map(|k| serrano_gov::parse_public_key(&k))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let extra = match checkpoints {
                None => vec![],
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(serde_json::from_str)
                    .collect::<Result<Vec<serrano_gov::Checkpoint>, _>>()
                    .with_context(|| format!("{} is not checkpoint JSON lines", p.display()))?,
            };
            let r = gov.verify_audit_with(trusted.as_ref(), &extra).await?;
            print_json(&r)?;
            if !r.ok {
                bail!(
                    "the audit chain does not verify: record {} ({})",
                    r.first_bad_seq.unwrap_or(0),
                    r.reason.unwrap_or_default()
                );
            }
            Ok(())
        }
        AuditCommand::Export { after, output } => {
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let (mut after, mut n) = (after, 0u64);
            loop {
                let page = gov.audit_records(after, 1000).await?;
                let Some(last) = page.last() else { break };
                after = last.seq as i64;
                for r in &page {
                    serde_json::to_writer(&mut out, r)?;
                    out.write_all(b"\n")?;
                    n += 1;
                }
            }
            out.flush()?;
            eprintln!("exported {n} audit records");
            Ok(())
        }
        AuditCommand::Keygen { out } => {
            let (key, seed) = serrano_gov::generate_signing_key();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts
                .open(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            f.write_all(format!("{seed}\n").as_bytes())?;
            let public: String = key
                .verifying_key()
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            eprintln!(
                "wrote the signing key to {}; its public key:",
                out.display()
            );
            println!("{public}");
            Ok(())
        }
        AuditCommand::Checkpoint { key } => {
            let key = serrano_gov::read_signing_key(&key)?;
            match gov.checkpoint(&key).await? {
                Some(cp) => print_json(&cp),
                None => {
                    eprintln!("nothing to sign: the log is empty or its head is signed already");
                    Ok(())
                }
            }
        }
        AuditCommand::Checkpoints => {
            for cp in gov.checkpoints().await? {
                println!("{}", serde_json::to_string(&cp)?);
            }
            Ok(())
        }
        AuditCommand::Erase { tenant } => {
            let n = gov.erase_content(&tenant).await?;
            let (target, after) = (json!({"tenant": tenant}), json!({"erased_records": n}));
            gov.record_event(&cli_actor(), "erase", "content", target, after)
                .await?;
            eprintln!("erased the stored content of {n} records of tenant '{tenant}'");
            Ok(())
        }
    })
}
