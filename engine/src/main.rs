//! The `bulwark` binary.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use bulwark::cli::{
    AuditFormat, CertsCommand, Cli, Command, FirewallCommand, FirewallFormat, KeysCommand,
    ModelCommand, SandboxCommand,
};
use bulwark::config::{Config, LogFormat};
use bulwark::model::pin::Pin;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Text => b.init(),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { config, log_format } => serve(&config, log_format),
        Command::CheckConfig {
            config,
            check_files,
        } => check_config(&config, check_files),
        Command::Audit {
            url,
            api_key_file,
            ca,
            insecure,
            timeout,
            deadline,
            format,
            intrusive,
        } => {
            let opts = bulwark::audit::Options {
                url,
                api_key: None,
                ca,
                insecure,
                timeout: std::time::Duration::from_secs(timeout.max(1)),
                deadline: std::time::Duration::from_secs(deadline.max(1)),
                intrusive,
            };
            audit(opts, api_key_file.as_deref(), format)
        }
        Command::Firewall { command } => firewall(command),
        Command::Init {
            dir,
            model,
            listen,
            name,
        } => done(init(&dir, &model, listen, name)),
        Command::Keys {
            command: KeysCommand::New { name, keys_file },
        } => done(new_key(&keys_file, &name)),
        Command::Model { command } => done(model(command)),
        Command::Certs { command } => done(certs(command)),
        Command::Sandbox {
            command: SandboxCommand::Allowlist { gpu },
        } => {
            println!("{}", bulwark::confine::allowlist_json(gpu));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn done(r: Result<()>) -> Result<ExitCode> {
    r.map(|()| ExitCode::SUCCESS)
}

fn serve(config: &Path, log_format: Option<LogFormat>) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    init_logging(log_format.unwrap_or(cfg.log.format));
    set_compute_threads(cfg.compute_threads());
    report_panics_without_backtraces();
    bulwark::serve::run(config)?;
    Ok(ExitCode::SUCCESS)
}

fn check_config(config: &Path, check_files: bool) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    if check_files {
        check_files_of(&cfg)?;
    }
    println!("{}: ok", config.display());
    Ok(ExitCode::SUCCESS)
}

fn firewall(command: FirewallCommand) -> Result<ExitCode> {
    match command {
        FirewallCommand::Print { config, format } => bulwark::firewall_cmd::print(
            &Config::load(&config)?,
            matches!(format, FirewallFormat::Json),
        )?,
        FirewallCommand::Apply { config } => bulwark::firewall_cmd::apply(&Config::load(&config)?)?,
        FirewallCommand::Verify { config } => {
            if !bulwark::firewall_cmd::verify(&Config::load(&config)?)? {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn new_key(keys_file: &Path, name: &str) -> Result<()> {
    let key = bulwark::keys::append_new_key(keys_file, name)?;
    eprintln!(
        "added key {name:?} to {}; it is shown only once:",
        keys_file.display()
    );
    println!("{key}");
    Ok(())
}

fn model(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Hash { path } if path.is_dir() => {
            let pins = bulwark::model::pin::directory_pins(&path)?;
            print!("{}", bulwark::model::pin::files_table(&pins))
        }
        ModelCommand::Hash { path } => println!("{}", bulwark::model::file::sha256_file(&path)?),
        ModelCommand::Inspect { file } => print!("{}", bulwark::model::inspect(&file)?),
    }
    Ok(())
}

fn certs(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Ca { dir } => {
            bulwark::certs::make_cluster_ca(&dir)?;
            eprintln!(
                "cluster CA written to {}: ca.pem, ca.key (keep ca.key offline)",
                dir.display()
            );
        }
        CertsCommand::Issue {
            ca_dir,
            name,
            ips,
            out,
        } => {
            bulwark::certs::issue_node_cert(&ca_dir, &name, &ips, &out)?;
            eprintln!(
                "certificate for {name} written to {}: cert.pem, key.pem",
                out.display()
            );
        }
    }
    Ok(())
}

/// Exit statuses of `bulwark audit`.
const AUDIT_FINDINGS: u8 = 1;
const AUDIT_USAGE_OR_UNREACHABLE: u8 = 2;
const AUDIT_INCONCLUSIVE: u8 = 3;

fn audit(
    mut opts: bulwark::audit::Options,
    api_key_file: Option<&Path>,
    format: AuditFormat,
) -> Result<ExitCode> {
    let usage = |e: anyhow::Error| {
        eprintln!("error: {e:#}");
        Ok(ExitCode::from(AUDIT_USAGE_OR_UNREACHABLE))
    };
    if let Some(f) = api_key_file {
        match bulwark::files::read_small(f, "API key file") {
            Ok(s) => opts.api_key = Some(s.lines().next().unwrap_or_default().trim().to_owned()),
            Err(e) => return usage(e),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = match rt.block_on(bulwark::audit::run(&opts)) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(ExitCode::from(AUDIT_USAGE_OR_UNREACHABLE)),
        Err(e) => return usage(e),
    };
    match format {
        AuditFormat::Text => print!("{}", bulwark::audit::render_text(&report)),
        AuditFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(match report.verdict() {
        bulwark::audit::Verdict::Pass => ExitCode::SUCCESS,
        bulwark::audit::Verdict::Fail => ExitCode::from(AUDIT_FINDINGS),
        bulwark::audit::Verdict::Inconclusive => ExitCode::from(AUDIT_INCONCLUSIVE),
    })
}

/// Size candle's compute pool before any thread exists: an oversubscribed spin-waiting pool
/// collapses throughput on small machines.
fn set_compute_threads(n: usize) {
    // SAFETY: called from main before any other thread is started, so no thread can be reading
    // the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}

/// A panic inside the sandbox must still say what happened: capturing a backtrace
/// (RUST_BACKTRACE=1) resolves symbols through files and calls the sandbox forbids, and the
/// process was killed before printing anything. The hook prints the message and location only.
fn report_panics_without_backtraces() {
    // SAFETY: called from main before any other thread is started (as above).
    unsafe {
        std::env::remove_var("RUST_BACKTRACE");
        std::env::remove_var("RUST_LIB_BACKTRACE");
    }
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        eprintln!(
            "panic in thread {}: {info}",
            thread.name().unwrap_or("unnamed")
        );
    }));
}

fn check_files_of(cfg: &Config) -> Result<()> {
    if let Some(c) = &cfg.cluster {
        bulwark::tls::ClusterIdentity::load(
            &cfg.resolve(&c.ca),
            &cfg.resolve(&c.cert),
            &cfg.resolve(&c.key),
        )
        .context("cluster.ca, cluster.cert, cluster.key")?;
    }
    let Some(server) = &cfg.server else {
        return check_model_pin(cfg);
    };
    bulwark::keys::KeyStore::load(&cfg.resolve(&server.keys_file))?;
    bulwark::serve::api_tls(cfg)?;
    check_model_pin(cfg)
}

fn check_model_pin(cfg: &Config) -> Result<()> {
    let pin = cfg.model.pin();
    bulwark::model::pin::OpenedModel::open(&cfg.resolve(&cfg.model.path), &pin)?.verify(&pin)?;
    Ok(())
}

fn init(
    dir: &Path,
    model: &Path,
    listen: std::net::SocketAddr,
    name: Option<String>,
) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let model =
        std::fs::canonicalize(model).with_context(|| format!("model {}", model.display()))?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        anyhow::bail!(
            "{} exists and is not empty; choose a new directory",
            dir.display()
        );
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("hashing {} ...", model.display());
    let pin = if model.is_dir() {
        Pin::Files(bulwark::model::pin::directory_pins(&model)?)
    } else {
        Pin::File(bulwark::model::file::sha256_file(&model)?)
    };
    // Refuse to write a configuration for a model we cannot serve.
    bulwark::model::inspect(&model)?;
    let name = name.unwrap_or_else(|| {
        model
            .file_name()
            .and_then(|s| s.to_string_lossy().split('.').next().map(str::to_lowercase))
            .unwrap_or_else(|| "model".into())
    });
    bulwark::certs::write_self_signed(
        bulwark::certs::names_for_listen(listen),
        &dir.join("cert.pem"),
        &dir.join("key.pem"),
    )?;
    let key = bulwark::keys::append_new_key(&dir.join("keys"), "default")?;
    let pin_toml = match &pin {
        Pin::File(sha) => format!("sha256 = \"{sha}\"\n"),
        Pin::Files(pins) => format!("\n{}", bulwark::model::pin::files_table(pins)),
    };
    let config = format!(
        "# Written by `bulwark init`; every key is documented in docs/configuration.md.\n\
         [server]\nlisten = \"{listen}\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\nkeys_file = \"keys\"\n\n\
         [model]\npath = {path}\nname = {name}\n{pin_toml}",
        path = toml_string(&model.to_string_lossy()),
        name = toml_string(&name),
    );
    let cfg_path = dir.join("bulwark.toml");
    std::fs::write(&cfg_path, config)?;
    Config::load(&cfg_path).context("the generated configuration does not validate")?;
    println!("config: {}", cfg_path.display());
    println!("model: {name} (pin {})", pin.identity());
    println!("url: https://{listen}/v1");
    println!("ca certificate: {}", dir.join("cert.pem").display());
    println!("api key: {key}");
    Ok(())
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
