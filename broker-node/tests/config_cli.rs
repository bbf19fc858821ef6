//! The configuration commands of the real `broker-node` binary.

use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_broker-node"))
}

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

#[test]
fn print_default_config_equals_the_committed_file_and_parses_back_to_the_defaults() {
    let out = bin().arg("print-default-config").output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(repo_file("config/flockmq.toml")).unwrap();
    assert_eq!(
        printed, committed,
        "regenerate config/flockmq.toml with print-default-config"
    );
    let parsed = broker_node::config::Config::from_toml(&printed).unwrap();
    assert_eq!(parsed, broker_node::config::Config::default());
}

#[test]
fn check_config_accepts_a_good_file_and_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "node_id = 2\n[mqtt]\nmax_packet_size = \"256KiB\"\n").unwrap();
    let out = bin().arg("check-config").arg(&good).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration ok"
    );

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[mqtt]\nmax_packet_sise = 10\n").unwrap();
    let out = bin().arg("check-config").arg(&unknown).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key 'mqtt.max_packet_sise'"));

    let invalid = dir.path().join("invalid.toml");
    std::fs::write(&invalid, "[cluster]\nwrite_timeout = \"soon\"\n").unwrap();
    let out = bin().arg("check-config").arg(&invalid).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'cluster.write_timeout'"));
}

#[test]
fn a_bad_flag_value_stops_the_node_with_the_key_named() {
    let out = bin()
        .args(["--mqtt-addr", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'mqtt_addr'"));
}
