//! The `broker-node` binary: parses the command line, loads the configuration,
//! installs logging and hands over to [`broker_node::node::run`]. Nothing else.

use std::process::ExitCode;

use broker_node::config::{default_config_toml, Config, RunArgs};
use clap::{Parser, Subcommand};

/// Every message crosses threads (a publisher's task allocates it, a subscriber's
/// frees it); jemalloc handles that far better than glibc's arenas.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's own figures, for `flockmq_allocator_bytes`.
fn jemalloc_stats() -> Option<broker_node::telemetry::AllocatorStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The figures are cached until the epoch advances.
    epoch::advance().ok()?;
    Some(broker_node::telemetry::AllocatorStats {
        allocated: stats::allocated::read().ok()? as u64,
        active: stats::active::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
        retained: stats::retained::read().ok()? as u64,
    })
}

/// jemalloc's settings, read when it starts (the environment's `_RJEM_MALLOC_CONF`
/// still overrides them). `tcache_max:256`: threads cache freed blocks of up to 256
/// bytes for reuse, not up to 32 KiB. A thread's cache is trimmed only as that thread
/// allocates, so once a storm of connections has parked, the caches of idle threads
/// (sled's I/O threads, the runtime's workers) keep the blocks the connection tasks
/// freed, and each cached block pins the whole slab it came from: jemalloc's bin
/// statistics showed 110 bytes a parked connection of nearly empty 448-byte slabs
/// (the session state's class) and about 120 more in the 256–1536 classes. RSS per
/// parked connection at 10,000 (the idle method of docs/benchmarks.md): 1,272 bytes
/// with the default, 1,120–1,253 with `tcache_max:4096`, 997–1,048 with
/// `tcache_max:256`. Fan-in, fan-out and pairs with 256 were within the noise of 4096
/// back to back; `tcache_max:128` gave 965 bytes but cut QoS 0 fan-in from about 1.0M
/// to 0.71M msg/s.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static C string.
    Some(unsafe { &*c"tcache_max:256".as_ptr() });

#[derive(Parser)]
#[command(
    name = "broker-node",
    version,
    about = "FlockMQ: a clustered MQTT 3.1.1 / 5.0 broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the documented default configuration (TOML).
    PrintDefaultConfig,
    /// Print the FlockMQ configuration equivalent to a mosquitto.conf (listeners,
    /// password and ACL files, bridges), ending with the lines it cannot carry over as
    /// comments.
    ImportMosquittoConf {
        /// The mosquitto.conf.
        file: std::path::PathBuf,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        /// The TOML file.
        file: std::path::PathBuf,
    },
    /// Operate a running node through its admin API.
    Ctl(broker_node::ctl::CtlArgs),
    /// Check a broker end to end as a client: subscribe on one connection, publish
    /// a QoS 1 message on another, and wait for it (exit 1 if it does not arrive).
    CheckPubsub {
        /// The MQTT listener, HOST:PORT (e.g. a Service in front of every node).
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: String,
        /// The username, if clients must log in.
        #[arg(long)]
        username: Option<String>,
        /// A file holding the password (its first line).
        #[arg(long, value_name = "FILE")]
        password_file: Option<std::path::PathBuf>,
        /// How long each step may take, e.g. 10s.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Make a CA for one cluster and a node certificate it signs (ca.pem, ca.key,
    /// node.pem, node.key in DIR) for cluster.tls_*; a DIR that already holds them
    /// is kept as it is.
    ClusterCerts {
        /// Where to write them.
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// A host name, IP address or wildcard (*.svc.example) the nodes are reached
        /// at; repeat it for each.
        #[arg(long = "host", value_name = "HOST", required = true)]
        hosts: Vec<String>,
        /// How long the certificates are valid, e.g. 825d or 10y.
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        valid_for: std::time::Duration,
    },
    /// Add a user to a password file, or change their password (the file is created
    /// if missing; same format as mosquitto_passwd). Reads the password from stdin
    /// unless --password is given.
    Passwd {
        /// The password file.
        file: std::path::PathBuf,
        /// The username.
        username: String,
        /// The password (visible to other local users in the process list: prefer stdin).
        #[arg(long)]
        password: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Ctl(args)) => match broker_node::ctl::run(&args) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("broker-node ctl: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Cmd::Passwd {
            file,
            username,
            password,
        }) => {
            let password = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    if let Err(e) = std::io::stdin().read_line(&mut line) {
                        eprintln!("cannot read the password from stdin: {e}");
                        return ExitCode::FAILURE;
                    }
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            match broker_node::auth::password::set_password(&file, &username, &password) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Some(Cmd::ImportMosquittoConf { file }) => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let imported = broker_node::mosquitto_conf::import(&text);
            print!("{}", imported.toml);
            if !imported.not_carried.is_empty() {
                println!("\n# Not carried over from {}:", file.display());
                for line in &imported.not_carried {
                    println!("#   {line}");
                }
            }
            ExitCode::SUCCESS
        }
        Some(Cmd::CheckPubsub {
            addr,
            username,
            password_file,
            timeout,
        }) => {
            let password = match password_file.map(std::fs::read_to_string).transpose() {
                Ok(p) => p.map(|p| p.lines().next().unwrap_or_default().to_owned()),
                Err(e) => {
                    eprintln!("broker-node check-pubsub: cannot read the password file: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let target = broker_node::check::Target {
                addr,
                username,
                password,
                timeout,
            };
            match broker_node::check::pubsub(&target) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("broker-node check-pubsub: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Cmd::ClusterCerts {
            dir,
            hosts,
            valid_for,
        }) => match broker_node::cluster::certs::make(&dir, &hosts, valid_for) {
            Ok(made) => {
                let what = match made {
                    broker_node::cluster::certs::Made::Created => {
                        "made a new cluster CA and node certificate in"
                    }
                    broker_node::cluster::certs::Made::Kept => {
                        "kept the cluster CA and node certificate already in"
                    }
                };
                println!("{what} {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("broker-node cluster-certs: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Cmd::PrintDefaultConfig) => {
            print!("{}", default_config_toml());
            ExitCode::SUCCESS
        }
        Some(Cmd::CheckConfig { file }) => {
            match Config::load(Some(&file), std::env::vars(), &RunArgs::default()) {
                Ok(_) => {
                    println!("configuration ok");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    ExitCode::from(2)
                }
            }
        }
        None => {
            let config = match Config::load(cli.run.config.as_deref(), std::env::vars(), &cli.run) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("configuration error: {e}");
                    return ExitCode::from(2);
                }
            };
            broker_node::logging::init(&config.log);
            broker_node::telemetry::report_allocator(jemalloc_stats);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(broker_node::node::run(config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("broker-node: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
