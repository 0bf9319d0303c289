//! Ed25519 checks for the receiver, batched across concurrent requests.
//!
//! The Ed25519 check is most of a heartbeat's cost. Checking many signatures together
//! (one multiscalar multiplication for the whole batch) costs about half as much per
//! signature as checking them one by one, so requests hand their check to a few verify
//! threads, and a thread takes every check waiting, up to [`MAX_BATCH`], as one batch.
//! Nothing waits to fill a batch: with one request in flight the batch is that one
//! request, checked strictly as before; batches only grow when requests queue up anyway,
//! which is exactly when the saving matters.
//!
//! A batch that fails is checked again one signature at a time, so a bad signature fails
//! only its own request; an attacker sending bad signatures costs the receiver at most
//! the batch plus the single checks it would have done without batching.
//!
//! Strictness: a single check is `verify_strict`. The batch equation is the cofactorless
//! one, which a *key holder* can satisfy with a signature `verify_strict` refuses (an `R`
//! with a small-order component); it proves the same thing — the holder of the enrolled
//! key signed this message — so the receiver accepts it. Nobody else can: small-order
//! public keys, the one way around that, are refused at enrolment
//! ([`crate::heartbeat::keys::PublicKey::from_b64`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use ed25519_dalek::{Signature, VerifyingKey};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Most signatures checked as one batch. Past a few dozen the saving per signature
/// levels off, while a failed batch's re-check grows with it.
pub const MAX_BATCH: usize = 64;
/// Checks waiting, at most; a request beyond it waits for room (back-pressure on the
/// connections, not memory).
const QUEUE: usize = 4096;

struct Job {
    key: VerifyingKey,
    message: Vec<u8>,
    signature: Signature,
    reply: oneshot::Sender<bool>,
}

/// The verify threads. Dropping the last handle ends them once the queue is empty.
#[derive(Clone)]
pub struct Verifier {
    tx: mpsc::Sender<Job>,
}

impl Verifier {
    /// Starts `threads` verify threads (at least one).
    ///
    /// # Errors
    /// The OS refused to start a thread.
    pub fn start(threads: usize) -> std::io::Result<Verifier> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            thread::Builder::new()
                .name(format!("vigil-verify-{i}"))
                .spawn(move || worker(&rx))?;
        }
        Ok(Verifier { tx })
    }

    /// Whether `signature` is `key`'s over `message`.
    pub async fn verify(&self, key: VerifyingKey, message: Vec<u8>, signature: Signature) -> bool {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            key,
            message,
            signature,
            reply,
        };
        match self.tx.send(job).await {
            // An error means a verify thread died with the job (it cannot panic on its
            // own: every call it makes returns a Result): never accept on an error.
            Ok(()) => answer.await.unwrap_or(false),
            // The threads are gone: check here rather than refuse a good heartbeat.
            Err(mpsc::error::SendError(job)) => {
                warn!("verify threads gone; checking inline");
                job.key.verify_strict(&job.message, &job.signature).is_ok()
            }
        }
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            // The lock is only ever held here, by a thread that cannot panic while
            // holding it; a poisoned lock still guards a usable receiver.
            let mut rx = rx.lock().unwrap_or_else(PoisonError::into_inner);
            match rx.blocking_recv() {
                Some(job) => jobs.push(job),
                None => return,
            }
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        check(&mut jobs);
    }
}

/// Answers every job in `jobs` (and empties it).
fn check(jobs: &mut Vec<Job>) {
    let all_good = jobs.len() > 1 && {
        let messages: Vec<&[u8]> = jobs.iter().map(|j| j.message.as_slice()).collect();
        let signatures: Vec<Signature> = jobs.iter().map(|j| j.signature).collect();
        let keys: Vec<VerifyingKey> = jobs.iter().map(|j| j.key).collect();
        ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
    };
    for job in jobs.drain(..) {
        let ok = all_good || job.key.verify_strict(&job.message, &job.signature).is_ok();
        // The request may have gone away (client closed): nobody to tell.
        let _ = job.reply.send(ok);
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};

    use super::*;

    fn signed(i: u8) -> (VerifyingKey, Vec<u8>, Signature) {
        let key = SigningKey::from_bytes(&[i; 32]);
        let message = format!("message {i}").into_bytes();
        let sig = key.sign(&message);
        (key.verifying_key(), message, sig)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_bad_signature_fails_alone_among_many_good_ones() {
        let v = Verifier::start(2).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 1..=200u8 {
            let v = v.clone();
            let (key, mut message, sig) = signed(i);
            if i % 50 == 0 {
                message.push(b'!'); // tampered
            }
            tasks.spawn(async move { (i, v.verify(key, message, sig).await) });
        }
        let mut bad = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let (i, ok) = r.unwrap();
            if !ok {
                bad.push(i);
            }
        }
        bad.sort_unstable();
        assert_eq!(bad, [50, 100, 150, 200]);
    }

    #[test]
    fn a_batch_with_one_bad_signature_answers_each_job() {
        let mut answers = Vec::new();
        let mut jobs = Vec::new();
        for i in 1..=8u8 {
            let (key, message, mut sig) = signed(i);
            if i == 3 {
                sig = signed(4).2; // another message's signature
            }
            let (reply, answer) = oneshot::channel();
            jobs.push(Job {
                key,
                message,
                signature: sig,
                reply,
            });
            answers.push(answer);
        }
        check(&mut jobs);
        assert!(jobs.is_empty());
        let got: Vec<bool> = answers
            .into_iter()
            .map(|mut a| a.try_recv().unwrap())
            .collect();
        assert_eq!(got, [true, true, false, true, true, true, true, true]);
    }

    #[tokio::test]
    async fn one_request_alone_is_checked_strictly() {
        let v = Verifier::start(1).unwrap();
        let (key, message, sig) = signed(7);
        assert!(v.verify(key, message.clone(), sig).await);
        let (_, _, other) = signed(8);
        assert!(!v.verify(key, message, other).await);
    }
}
