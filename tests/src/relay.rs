//! A TCP relay on loopback whose connections a test can cut at any moment: both
//! sockets of every relayed connection are shut down at once, as a broken network
//! path looks to each end. New connections are relayed again right after.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The relay; stops accepting and cuts everything when dropped.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    /// Both sockets of each relayed connection.
    open: Mutex<Vec<(TcpStream, TcpStream)>>,
    cuts: AtomicU64,
    stop: AtomicBool,
}

impl Relay {
    /// Relay connections made to the returned relay's address to `to`.
    pub fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let shared = Arc::new(Shared {
            open: Mutex::new(Vec::new()),
            cuts: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        // Blocking accepts; dropping the relay wakes the last one with a connection
        // of its own.
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(inbound) = inbound {
                    relay(inbound, to, &s);
                }
            }
        });
        Relay { addr, shared }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cut every connection relayed now; how many there were.
    pub fn cut(&self) -> usize {
        let open = std::mem::take(&mut *self.shared.open.lock().expect("relay lock"));
        for (a, b) in &open {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        if !open.is_empty() {
            self.shared.cuts.fetch_add(1, Ordering::Relaxed);
        }
        open.len()
    }

    /// How many times [`Relay::cut`] cut at least one connection.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        self.cut();
    }
}

fn relay(inbound: TcpStream, to: SocketAddr, shared: &Shared) {
    let Ok(outbound) = TcpStream::connect(to) else {
        let _ = inbound.shutdown(Shutdown::Both);
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (Ok(a), Ok(b)) = (inbound.try_clone(), outbound.try_clone()) else {
        return;
    };
    shared.open.lock().expect("relay lock").push((
        inbound.try_clone().expect("clone"),
        outbound.try_clone().expect("clone"),
    ));
    std::thread::spawn(move || pipe(inbound, outbound));
    std::thread::spawn(move || pipe(b, a));
}

/// Copy `from` to `to` until either ends, then end both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
