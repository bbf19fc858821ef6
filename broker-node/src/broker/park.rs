//! The parking lot: idle connections (plain TCP, and TLS over it) held without a task.
//!
//! A device that connects and then sends a PINGREQ a minute costs, as a task, its whole
//! connection future (the session state and the select over socket, mailbox, timers
//! and shutdown), tokio's task cell and its I/O registration: about 2 KiB. Once a
//! connection has been idle for `mqtt.park_after`, with nothing in flight, nothing
//! buffered and nothing waiting in its mailbox, its task hands a compact record of the
//! session ([`connection::Parked`]) to the lot and ends; a TLS connection hands over
//! its rustls session too (its keys and sequence numbers), without the task, our
//! buffers or the stream wrapper. The lot keeps the socket in
//! an epoll set of its own (through `mio`, with no allocation per socket) and the
//! record in a slab; one task drives them all.
//!
//! A parked connection wakes when
//! - its socket has something to read (or is closed): on a plain connection a lone
//!   PINGREQ is answered here without waking it, anything else resumes it (on a TLS
//!   connection, anything at all: the records are decrypted by the resumed task);
//! - its mailbox receives something (a delivery, a take-over, an administrative
//!   disconnect): the mailbox's waker names it to the lot;
//! - its keep alive runs out (checked once a second): it resumes and closes as any
//!   connection does, its will included;
//! - the node shuts down: every parked connection resumes and says goodbye.
//!
//! Resuming moves the socket back into tokio's reactor and spawns a task that picks
//! the session up where it was ([`connection::resume`]); the client sees nothing.
//! Tokens carry a generation next to the slab key, so a late wake-up for a record
//! that has left cannot resume whichever record took its slot.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use super::connection::{self, Parked};
use super::{Broker, Stats};
use crate::telemetry;

/// How often parked connections' keep alives are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// The token of the waker that stops the epoll thread (no slot's token: keys stay
/// below `u32::MAX`).
const STOP: Token = Token(usize::MAX);

/// The MQTT PINGREQ packet, and the PINGRESP that answers it.
const PINGREQ: [u8; 2] = [0xC0, 0x00];
const PINGRESP: [u8; 2] = [0xD0, 0x00];

/// Where parked connections wait. Shared by the connection tasks (which park) and
/// the driver (which wakes them).
pub struct Lot {
    registry: mio::Registry,
    slots: Mutex<Slots>,
    /// Tokens whose sockets or mailboxes called since the driver last looked.
    woken: Mutex<Vec<(u64, Why)>>,
    wake_driver: Notify,
    parked_gauge: metrics::Gauge,
}

struct Slots {
    slab: Slab<Slot>,
    next_generation: u32,
    /// False once the node shuts down: nothing parks any more.
    open: bool,
}

struct Slot {
    generation: u32,
    parked: Box<Parked>,
    /// A TLS connection's session: here rather than in the record, which stays in
    /// jemalloc's 128-byte class for plain connections.
    tls: Option<Tls>,
}

/// A parked TLS connection's rustls session.
pub type Tls = Box<rustls::ServerConnection>;

/// The driver's half: the epoll set that waits on parked sockets.
pub struct Driver {
    poll: Poll,
}

/// Why a parked connection resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Readable,
    Mailbox,
    KeepAlive,
    Shutdown,
}

impl Why {
    fn label(self) -> &'static str {
        match self {
            Why::Readable => "readable",
            Why::Mailbox => "mailbox",
            Why::KeepAlive => "keep_alive",
            Why::Shutdown => "shutdown",
        }
    }
}

fn token_of(key: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | key as u64
}

fn split(token: u64) -> (usize, u32) {
    ((token & 0xffff_ffff) as usize, (token >> 32) as u32)
}

/// A mailbox's wake-up for a parked connection: names its token to the lot.
struct MailboxWake {
    lot: Weak<Lot>,
    token: u64,
}

impl Wake for MailboxWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(lot) = self.lot.upgrade() {
            lock(&lot.woken).push((self.token, Why::Mailbox));
            lot.wake_driver.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lot {
    /// A lot and its driver (to be run with [`Driver::run`]).
    pub fn new() -> std::io::Result<(Arc<Lot>, Driver)> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let lot = Arc::new(Lot {
            registry,
            slots: Mutex::new(Slots {
                slab: Slab::new(),
                next_generation: 0,
                open: true,
            }),
            woken: Mutex::new(Vec::new()),
            wake_driver: Notify::new(),
            parked_gauge: metrics::gauge!("flockmq_connections_parked"),
        });
        Ok((lot, Driver { poll }))
    }

    /// How many connections are parked.
    pub fn len(&self) -> usize {
        lock(&self.slots).slab.len()
    }

    /// Whether no connection is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Park `parked` (with its TLS session, if it has one); gives them back if the lot
    /// is closed (the node is shutting down) or its socket cannot be watched.
    pub fn park(
        self: &Arc<Self>,
        parked: Box<Parked>,
        tls: Option<Tls>,
    ) -> Result<(), (Box<Parked>, Option<Tls>)> {
        let mut slots = lock(&self.slots);
        if !slots.open {
            return Err((parked, tls));
        }
        let key = slots.slab.vacant_key();
        if key >= u32::MAX as usize {
            return Err((parked, tls));
        }
        let generation = slots.next_generation;
        slots.next_generation = generation.wrapping_add(1);
        let token = token_of(key, generation);
        let fd = parked.socket().as_raw_fd();
        if let Err(e) = self.registry.register(
            &mut SourceFd(&fd),
            Token(token as usize),
            Interest::READABLE,
        ) {
            tracing::warn!(error = %e, "cannot park a connection");
            return Err((parked, tls));
        }
        // May wake at once (something arrived while parking): the token is pushed to
        // `woken`, and the driver finds the slot once this lock is released.
        parked.wake_on_mail(Waker::from(Arc::new(MailboxWake {
            lot: Arc::downgrade(self),
            token,
        })));
        slots.slab.insert(Slot {
            generation,
            parked,
            tls,
        });
        self.parked_gauge.increment(1.0);
        Ok(())
    }

    /// Take the record behind `token` out of the lot, if it is still there, its socket
    /// no longer watched.
    fn take(&self, slots: &mut Slots, token: u64) -> Option<(Box<Parked>, Option<Tls>)> {
        let (key, generation) = split(token);
        if slots.slab.get(key)?.generation != generation {
            return None;
        }
        let slot = slots.slab.remove(key);
        let fd = slot.parked.socket().as_raw_fd();
        if let Err(e) = self.registry.deregister(&mut SourceFd(&fd)) {
            tracing::debug!(error = %e, "deregistering a parked socket");
        }
        self.parked_gauge.decrement(1.0);
        Some((slot.parked, slot.tls))
    }

    /// Answer a lone PINGREQ on the parked connection behind `token` in place;
    /// `false` if it must resume instead (other bytes, end of stream, an error).
    fn answer_ping(&self, slots: &mut Slots, token: u64, broker: &Broker) -> bool {
        let (key, generation) = split(token);
        let Some(slot) = slots.slab.get_mut(key) else {
            return true;
        };
        if slot.generation != generation {
            return true;
        }
        if slot.tls.is_some() {
            // Records to decrypt: the resumed connection reads them.
            return false;
        }
        // `&TcpStream` reads and writes; the socket is in non-blocking mode.
        let mut socket: &std::net::TcpStream = slot.parked.socket();
        let mut peeked = [0u8; 3];
        match socket.peek(&mut peeked) {
            Ok(2) if peeked[..2] == PINGREQ => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            _ => return false,
        }
        // Answer first and take the PINGREQ out only once the answer is written: a
        // full send buffer leaves the PINGREQ to the resumed connection.
        match socket.write(&PINGRESP) {
            Ok(2) => {}
            Ok(_) => {
                // Half a PINGRESP went out: the stream is broken for the client.
                let _ = socket.shutdown(std::net::Shutdown::Both);
                return false;
            }
            Err(_) => return false,
        }
        let mut consumed = [0u8; 2];
        if !matches!(socket.read(&mut consumed), Ok(2)) {
            return false;
        }
        slot.parked.seen(Instant::now());
        Stats::add(&broker.stats.bytes_received, 2);
        Stats::add(&broker.stats.bytes_sent, 2);
        let hot = telemetry::hot();
        hot.bytes_received.increment(2);
        hot.bytes_sent.increment(2);
        hot.packets_received.increment(1);
        true
    }
}

impl Driver {
    /// Wake parked connections as their sockets, mailboxes and keep alives say, until
    /// the node shuts down; then resume every one of them (on `tracker`, so that
    /// shutdown waits for them) and close the lot.
    pub async fn run(self, lot: Arc<Lot>, broker: Arc<Broker>, tracker: TaskTracker) {
        let stop = match self.watch(&lot) {
            Ok(stop) => Some(stop),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch parked sockets; connections will not park");
                lock(&lot.slots).open = false;
                None
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = broker.shutdown.clone();
        let mut due: Vec<(u64, Why)> = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = lot.wake_driver.notified() => {
                    due.append(&mut lock(&lot.woken));
                }
                _ = sweep.tick() => {
                    let now = Instant::now();
                    let slots = lock(&lot.slots);
                    due.extend(
                        slots
                            .slab
                            .iter()
                            .filter(|(_, s)| s.parked.keep_alive_expired(now))
                            .map(|(key, s)| (token_of(key, s.generation), Why::KeepAlive)),
                    );
                }
            }
            for (token, why) in due.drain(..) {
                let parked = {
                    let mut slots = lock(&lot.slots);
                    if why == Why::Readable && lot.answer_ping(&mut slots, token, &broker) {
                        continue;
                    }
                    lot.take(&mut slots, token)
                };
                if let Some((parked, tls)) = parked {
                    resume(&broker, &tracker, parked, tls, why);
                }
            }
        }
        if let Some(stop) = stop {
            let _ = stop.wake();
        }
        // Shutting down: nothing parks from now on, and everything parked resumes to
        // end its session as a connected one would.
        let all: Vec<(Box<Parked>, Option<Tls>)> = {
            let mut slots = lock(&lot.slots);
            slots.open = false;
            let tokens: Vec<u64> = slots
                .slab
                .iter()
                .map(|(key, s)| token_of(key, s.generation))
                .collect();
            tokens
                .into_iter()
                .filter_map(|t| lot.take(&mut slots, t))
                .collect()
        };
        tracing::debug!(parked = all.len(), "parking lot closed");
        for (parked, tls) in all {
            resume(&broker, &tracker, parked, tls, Why::Shutdown);
        }
    }

    /// Start the thread that waits on the epoll set and names ready sockets to the
    /// driver; the returned waker stops it.
    fn watch(self, lot: &Arc<Lot>) -> std::io::Result<mio::Waker> {
        let Driver { mut poll } = self;
        let stop = mio::Waker::new(poll.registry(), STOP)?;
        let lot = Arc::downgrade(lot);
        std::thread::Builder::new()
            .name("flockmq-park".into())
            .spawn(move || {
                let mut events = Events::with_capacity(1024);
                loop {
                    if let Err(e) = poll.poll(&mut events, None) {
                        if e.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        tracing::error!(error = %e, "waiting on parked sockets failed");
                        return;
                    }
                    let Some(lot) = lot.upgrade() else { return };
                    let mut stopping = false;
                    {
                        let mut woken = lock(&lot.woken);
                        for event in &events {
                            if event.token() == STOP {
                                stopping = true;
                            } else {
                                woken.push((event.token().0 as u64, Why::Readable));
                            }
                        }
                    }
                    lot.wake_driver.notify_one();
                    if stopping {
                        return;
                    }
                }
            })?;
        Ok(stop)
    }
}

fn resume(
    broker: &Arc<Broker>,
    tracker: &TaskTracker,
    parked: Box<Parked>,
    tls: Option<Tls>,
    why: Why,
) {
    metrics::counter!("flockmq_connections_unparked_total", "why" => why.label()).increment(1);
    tracker.spawn(connection::resume(broker.clone(), parked, tls));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_key_and_generation() {
        for (key, generation) in [(0, 0), (7, 3), (u32::MAX as usize - 1, u32::MAX)] {
            assert_eq!(split(token_of(key, generation)), (key, generation));
        }
        assert_ne!(token_of(u32::MAX as usize - 1, u32::MAX), STOP.0 as u64);
    }

    #[test]
    fn every_wake_reason_is_in_the_metrics_catalog() {
        let all = [Why::Readable, Why::Mailbox, Why::KeepAlive, Why::Shutdown];
        let labels: Vec<&str> = all.iter().map(|w| w.label()).collect();
        assert_eq!(labels, crate::telemetry::catalog::UNPARK_REASONS);
    }
}
