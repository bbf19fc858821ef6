//! A connection's mailbox: what the rest of the node tells one connection task (deliver
//! this, your queue grew, you were taken over), bounded so that a slow client pushes
//! back on its publishers.
//!
//! Why not `tokio::sync::mpsc`: a bounded tokio channel allocates its shared state
//! padded to cache lines (512 bytes) plus a first block of 32 slots at creation, over a
//! kilobyte per connection before any message flows, and most connections of a fleet
//! sit idle. Here the shared state is one allocation of 96 bytes (jemalloc's size
//! class; the test below keeps it there), and the queue takes memory only while it
//! holds messages ([`Receiver::release`] gives it back).
//!
//! State: a boxed `VecDeque` (absent while empty), a flag and the receiver's waker under a `std::sync::Mutex`
//! (held for a push or a pop, never across an await), and a `Notify`, `room`, that
//! wakes senders waiting for space. The one receiver leaves its waker under the lock
//! before it sleeps, and a sender takes it under the same lock, so no wake-up is lost.
//! That waker need not belong to a task: a parked connection's mailbox wakes the
//! parking lot ([`Receiver::wake_on_arrival`]).
//!
//! A receiver that stops taking anything must not hold every sender back: once a
//! sender has waited [`Sender::send_timeout`]'s whole timeout for room, the mailbox is
//! *stalled* and further senders finding it full give up at once, until the receiver
//! has drained it to half its capacity. A slow receiver thus costs its senders one
//! wait per stall, not one per message (a subscriber to `#` that never read held
//! every publisher of the node to one message per timeout).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

/// A bounded queue of `T` from many senders to one receiver.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: None,
            closed: false,
            stalled: false,
            receiver: None,
        }),
        room: Notify::new(),
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX).max(1),
        senders: AtomicU32::new(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    /// Something was taken out, or the receiver closed.
    room: Notify,
    capacity: u32,
    senders: AtomicU32,
}

struct Queue<T> {
    /// Boxed, so that an idle mailbox holds one word for it rather than four
    /// (measured: the shared state falls from the 128-byte to the 96-byte class).
    #[allow(clippy::box_collection)]
    items: Option<Box<VecDeque<T>>>,
    /// The receiver is gone or closed: nothing more is accepted.
    closed: bool,
    /// A sender waited a whole timeout for room in vain, and the receiver has not
    /// drained the queue to half its capacity since: senders that find it full do not
    /// wait.
    stalled: bool,
    /// Woken when something arrives or the last sender goes away.
    receiver: Option<Waker>,
}

impl<T> Queue<T> {
    fn len(&self) -> usize {
        self.items.as_ref().map_or(0, |items| items.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_back(&mut self, item: T) {
        self.items.get_or_insert_with(Box::default).push_back(item);
    }

    /// The first message, if any; taking the queue down to `half` ends a stall.
    fn pop_front(&mut self, half: usize) -> Option<T> {
        let msg = self.items.as_mut()?.pop_front();
        if self.stalled && self.len() <= half {
            self.stalled = false;
        }
        msg
    }

    /// The receiver's waker, if it waits, for waking once the lock is released.
    fn take_receiver(&mut self) -> Option<Waker> {
        self.receiver.take()
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        // No code panics while holding the lock; a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The length a stalled queue must drain to before senders wait again.
    fn half(&self) -> usize {
        self.capacity as usize / 2
    }

    /// Take the first message, if any, and tell a sender waiting for room.
    fn take(&self) -> Option<T> {
        let msg = self.lock().pop_front(self.half());
        if msg.is_some() {
            self.room.notify_one();
        }
        msg
    }
}

/// Why a message was not taken; it comes back to the sender.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue is at capacity.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// The sending side; cheap to clone.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The receiver learns there is nothing more to wait for.
            let waker = self.shared.lock().take_receiver();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

impl<T> Sender<T> {
    /// Queue `msg` if there is room.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        let mut queue = self.shared.lock();
        if queue.closed {
            return Err(TrySendError::Closed(msg));
        }
        if queue.len() >= self.shared.capacity as usize {
            return Err(TrySendError::Full(msg));
        }
        queue.push_back(msg);
        let waker = queue.take_receiver();
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Queue `msg`, waiting up to `timeout` for room; gives it back if it could not.
    /// A full mailbox that is stalled (see the module's documentation) gives it back
    /// at once, and one that stays full for the whole `timeout` becomes stalled.
    pub async fn send_timeout(&self, msg: T, timeout: Duration) -> Result<(), TrySendError<T>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut msg = msg;
        loop {
            let room = self.shared.room.notified();
            match self.try_send(msg) {
                Err(TrySendError::Full(back)) => msg = back,
                done => return done,
            }
            if self.shared.lock().stalled {
                return Err(TrySendError::Full(msg));
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                let sent = self.try_send(msg);
                if matches!(sent, Err(TrySendError::Full(_))) {
                    self.shared.lock().stalled = true;
                }
                return sent;
            }
        }
    }
}

/// The receiving side, owned by the connection task.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next message; `None` once closed and empty, or when every sender is gone.
    /// Cancel-safe: a message is only taken out by the poll that returns it.
    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll for the next message, leaving `cx`'s waker to be woken when one arrives.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut queue = self.shared.lock();
        if let Some(msg) = queue.pop_front(self.shared.half()) {
            drop(queue);
            self.shared.room.notify_one();
            return Poll::Ready(Some(msg));
        }
        if queue.closed || self.shared.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(None);
        }
        match &mut queue.receiver {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Wake `waker` once something arrives or the last sender goes away: at once if
    /// that has already happened. Replaces the waker of an earlier wait.
    pub fn wake_on_arrival(&self, waker: Waker) {
        let mut queue = self.shared.lock();
        let ready =
            !queue.is_empty() || queue.closed || self.shared.senders.load(Ordering::Acquire) == 0;
        if ready {
            queue.receiver = None;
            drop(queue);
            waker.wake();
        } else {
            queue.receiver = Some(waker);
        }
    }

    /// Whether nothing is waiting to be received.
    pub fn is_empty(&self) -> bool {
        self.shared.lock().is_empty()
    }

    /// The next message if one is waiting.
    pub fn try_recv(&self) -> Option<T> {
        self.shared.take()
    }

    /// Accept nothing more; what is queued can still be taken with
    /// [`Receiver::try_recv`]. Senders waiting for room give up.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.room.notify_waiters();
    }

    /// Give back the queue's memory if it is empty (an idle connection holds none).
    pub fn release(&self) {
        let mut queue = self.shared.lock();
        if queue.is_empty() {
            queue.items = None;
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_and_a_full_queue_pushes_back() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send_timeout(3, Duration::from_secs(5)).await })
        };
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(
            waiting.await.unwrap(),
            Ok(()),
            "room made for the waiting sender"
        );
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(
            tx.send_timeout(4, Duration::from_millis(10)).await,
            Ok(()),
            "room again"
        );
        tx.try_send(5).unwrap();
        assert_eq!(
            tx.send_timeout(6, Duration::from_millis(50)).await,
            Err(TrySendError::Full(6)),
            "no room within the timeout"
        );
    }

    #[tokio::test]
    async fn a_receiver_that_takes_nothing_costs_its_senders_one_wait_until_it_drains_half() {
        let (tx, rx) = channel(4);
        for i in 0..4 {
            tx.try_send(i).unwrap();
        }
        let short = Duration::from_millis(50);
        let long = Duration::from_secs(30);
        let started = std::time::Instant::now();
        assert_eq!(tx.send_timeout(4, short).await, Err(TrySendError::Full(4)));
        assert!(started.elapsed() >= short, "the first sender waits");
        // Stalled: the next senders give up at once, however long they would wait.
        let started = std::time::Instant::now();
        assert_eq!(tx.send_timeout(5, long).await, Err(TrySendError::Full(5)));
        assert_eq!(
            tx.clone().send_timeout(6, long).await,
            Err(TrySendError::Full(6))
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no wait while stalled"
        );
        // Taking one makes room for one, and the stall goes on.
        assert_eq!(rx.try_recv(), Some(0));
        assert_eq!(tx.send_timeout(7, long).await, Ok(()));
        assert_eq!(tx.send_timeout(8, long).await, Err(TrySendError::Full(8)));
        // Drained to half its capacity, the mailbox pushes back again: a sender waits
        // for room, and gets it as the receiver takes the next message.
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.try_recv(), Some(2));
        tx.try_send(9).unwrap();
        tx.try_send(10).unwrap();
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send_timeout(11, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a sender waits for room again");
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(waiting.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn closing_keeps_what_was_queued_and_refuses_the_rest() {
        let (tx, mut rx) = channel(4);
        tx.try_send("a").unwrap();
        rx.close();
        assert_eq!(tx.try_send("b"), Err(TrySendError::Closed("b")));
        assert_eq!(rx.try_recv(), Some("a"));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_a_message_and_ends_when_the_senders_are_gone() {
        let (tx, mut rx) = channel(4);
        let receiving = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(7).unwrap();
        drop(tx);
        assert_eq!(receiving.await.unwrap(), (Some(7), None));
    }

    #[tokio::test]
    async fn release_frees_an_empty_queue_only() {
        let (tx, rx) = channel(64);
        for i in 0..10 {
            tx.try_send(i).unwrap();
        }
        rx.release();
        assert_eq!(rx.try_recv(), Some(0), "a non-empty queue is kept");
        while rx.try_recv().is_some() {}
        rx.release();
        assert!(rx.shared.lock().items.is_none());
    }

    #[test]
    fn an_idle_mailbox_is_one_96_byte_allocation() {
        // `Arc`'s two counts and the shared state: jemalloc's 96-byte class.
        assert!(16 + std::mem::size_of::<Shared<crate::broker::ConnMsg>>() <= 96);
    }

    /// Counts its wake-ups.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waker_left_without_a_task_is_woken_by_the_next_message_or_the_last_sender() {
        let (tx, rx) = channel::<u32>(4);
        let counter = Arc::new(Counter(std::sync::atomic::AtomicUsize::new(0)));
        rx.wake_on_arrival(Waker::from(counter.clone()));
        assert_eq!(counter.0.load(Ordering::SeqCst), 0, "nothing arrived yet");
        tx.try_send(1).unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "woken by the message");
        tx.try_send(2).unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "a waker is woken once");

        // Something already waiting wakes at once.
        rx.wake_on_arrival(Waker::from(counter.clone()));
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);

        while rx.try_recv().is_some() {}
        rx.wake_on_arrival(Waker::from(counter.clone()));
        drop(tx);
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            3,
            "woken when the senders are gone"
        );
    }
}
