//! Hosts of their own for cluster tests: one network namespace per node, joined by a
//! bridge, so that a node can be cut off from its peers for real (packets dropped by
//! the kernel, not a process playing dead) while the test's clients still reach it.
//!
//! Layout (names carry this process's id and a counter, so tests run in parallel):
//!
//! ```text
//!  test process (host namespace) 10.N.M.1 ── veth ──┐
//!                                                   ├─ bridge, in a hub namespace
//!  node 1 (namespace …n1) 10.N.M.11 ── veth ────────┤
//!  node 2 (namespace …n2) 10.N.M.12 ── veth ────────┘ …
//! ```
//!
//! The bridge lives in a namespace of its own because the host's firewall may drop
//! bridged traffic (Docker sets `FORWARD DROP`); a fresh namespace has no such rules.
//! A cut is a pair of `iptables` DROP rules per peer inside the cut node's namespace:
//! silent, in both directions, and its MQTT clients (coming from 10.N.M.1) unaffected.
//!
//! Needs root (or CAP_NET_ADMIN) and the `ip` and `iptables` commands.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A set of namespaces for `n` nodes and the bridge between them; removed on drop.
pub struct Network {
    prefix: String,
    subnet: [u8; 3],
    nodes: usize,
}

/// Runs `ip`/`iptables` with `args`; panics with its output if it fails.
fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Like [`sh`], for clean-up: failures are ignored.
fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

impl Network {
    /// Namespaces and links for `nodes` nodes (at most 200).
    pub fn new(nodes: usize) -> Network {
        assert!((1..=200).contains(&nodes));
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let serial = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let net = Network {
            // Interface names may have 15 characters: "fq" + 5 + 2 + "n200" fits.
            prefix: format!("fq{}{}", pid % 100_000, serial % 100),
            subnet: [10, 200 + (pid % 50) as u8, (serial % 250) as u8],
            nodes,
        };
        net.build();
        net
    }

    fn hub(&self) -> String {
        format!("{}h", self.prefix)
    }

    fn host_link(&self) -> String {
        format!("{}t", self.prefix)
    }

    /// The namespace of node `i` (1-based).
    pub fn namespace(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    /// The address of node `i` (1-based).
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 10 + i as u8)
    }

    fn host_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    fn build(&self) {
        let hub = self.hub();
        sh("ip", &["netns", "add", &hub]);
        sh("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        sh("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        let host = self.host_link();
        sh(
            "ip",
            &[
                "link", "add", &host, "type", "veth", "peer", "name", "p0", "netns", &hub,
            ],
        );
        sh(
            "ip",
            &["-n", &hub, "link", "set", "p0", "master", "br0", "up"],
        );
        let host_cidr = format!("{}/24", self.host_addr());
        sh("ip", &["addr", "add", &host_cidr, "dev", &host]);
        sh("ip", &["link", "set", &host, "up"]);
        for i in 1..=self.nodes {
            let ns = self.namespace(i);
            let port = format!("p{i}");
            sh("ip", &["netns", "add", &ns]);
            sh(
                "ip",
                &[
                    "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            );
            sh(
                "ip",
                &["-n", &hub, "link", "set", &port, "master", "br0", "up"],
            );
            let cidr = format!("{}/24", self.addr(i));
            sh("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
    }

    /// Cut node `i` off from every other node, both ways; the test's clients still
    /// reach it.
    pub fn cut(&self, i: usize) {
        let ns = self.namespace(i);
        for peer in (1..=self.nodes).filter(|&p| p != i) {
            let peer = self.addr(peer).to_string();
            for (chain, flag) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
                sh(
                    "ip",
                    &[
                        "netns", "exec", &ns, "iptables", "-A", chain, flag, &peer, "-j", "DROP",
                    ],
                );
            }
        }
    }

    /// Undo [`Network::cut`] for node `i`.
    pub fn heal(&self, i: usize) {
        let ns = self.namespace(i);
        for chain in ["INPUT", "OUTPUT"] {
            sh("ip", &["netns", "exec", &ns, "iptables", "-F", chain]);
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for i in 1..=self.nodes {
            sh_quiet("ip", &["netns", "del", &self.namespace(i)]);
        }
        sh_quiet("ip", &["netns", "del", &self.hub()]);
        // The namespace's end of the veth goes with it, but not always at once.
        sh_quiet("ip", &["link", "del", &self.host_link()]);
    }
}
