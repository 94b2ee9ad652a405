//! `basic_auth_users` of `--web-config`: who may scrape. bcrypt is slow by design (tens to
//! hundreds of milliseconds a check at the costs users pick), so a wrong password must not
//! be able to slow anything else down:
//!
//! - checks run on tokio's blocking pool, never on the thread that reads events, one at a
//!   time: a flood of wrong passwords queues (each client holds one of the exporter's
//!   connection slots meanwhile) and leaves the other core to tracing;
//! - a password once verified is remembered, and so is a recent failure (each as a SHA-256
//!   digest of user and password, never in clear): a scraper or a client repeating itself
//!   costs no bcrypt at all;
//! - an unknown user costs a check against a hash of the users' cost, so the answer's time
//!   does not tell which users exist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use tokio::sync::Semaphore;

/// Failures remembered at most, and for how long.
const FAILURES_KEPT: usize = 1024;
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

type Digest = [u8; 32];

pub struct BasicAuth {
    users: HashMap<String, String>,
    /// The highest cost among the users' hashes: what an unknown user's check costs.
    cost: u32,
    /// A hash no password matches, at `cost`, made at the first unknown user.
    decoy: Arc<OnceLock<String>>,
    verified: Mutex<HashMap<String, Digest>>,
    failed: Mutex<HashMap<Digest, Instant>>,
    /// One bcrypt check at a time.
    checking: Semaphore,
    /// bcrypt checks made.
    #[cfg(test)]
    checks: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// SHA-256 of `user:password`.
fn digest(user: &str, password: &str) -> Digest {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(user.as_bytes());
    context.update(b":");
    context.update(password.as_bytes());
    context
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The user and password of an `Authorization: Basic` header.
fn credentials(authorization: Option<&[u8]>) -> Option<(String, String)> {
    use base64::Engine;
    let encoded = authorization?.strip_prefix(b"Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

impl BasicAuth {
    pub fn new(users: HashMap<String, String>) -> Result<BasicAuth> {
        let mut cost = 4;
        for (user, hash) in &users {
            let parts = hash
                .parse::<bcrypt::HashParts>()
                .map_err(|e| anyhow!("basic_auth_users: {user}: not a bcrypt hash ({e})"))?;
            cost = cost.max(parts.get_cost());
        }
        Ok(BasicAuth {
            users,
            cost,
            decoy: Arc::new(OnceLock::new()),
            verified: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            checking: Semaphore::new(1),
            #[cfg(test)]
            checks: Default::default(),
        })
    }

    /// Whether an `Authorization` header's value names a user with their password.
    pub async fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = credentials(authorization) else {
            return false;
        };
        let digest = digest(&user, &password);
        if self.lock_verified().get(&user) == Some(&digest) {
            return true;
        }
        if self.failed_recently(&digest) {
            return false;
        }
        let Ok(_permit) = self.checking.acquire().await else {
            return false;
        };
        #[cfg(test)]
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hash = self.users.get(&user).cloned();
        let (decoy, cost) = (self.decoy.clone(), self.cost);
        let ok = tokio::task::spawn_blocking(move || match hash {
            Some(hash) => bcrypt::verify(&password, &hash).unwrap_or(false),
            None => {
                let decoy = decoy.get_or_init(|| bcrypt::hash("", cost).unwrap_or_default());
                let _ = bcrypt::verify(&password, decoy);
                false
            }
        })
        .await
        .unwrap_or(false);
        if ok {
            self.lock_verified().insert(user, digest);
        } else {
            self.remember_failure(digest);
        }
        ok
    }

    fn lock_verified(&self) -> std::sync::MutexGuard<'_, HashMap<String, Digest>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed_recently(&self, digest: &Digest) -> bool {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed
            .get(digest)
            .is_some_and(|at| at.elapsed() < FAILURE_MEMORY)
    }

    fn remember_failure(&self, digest: Digest) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.len() >= FAILURES_KEPT {
            failed.retain(|_, at| at.elapsed() < FAILURE_MEMORY);
        }
        if failed.len() >= FAILURES_KEPT {
            let oldest = failed.iter().min_by_key(|(_, at)| **at).map(|(d, _)| *d);
            failed.remove(&oldest.expect("full, so not empty"));
        }
        failed.insert(digest, Instant::now());
    }

    /// Failures remembered (for tests).
    #[cfg(test)]
    fn failures(&self) -> usize {
        self.failed.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {token}").into_bytes()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_verified_password_is_remembered_and_a_wrong_one_refused() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("prom".to_owned(), hash)].into()).unwrap();
        runtime().block_on(async {
            assert!(auth.allows(Some(&header("prom", "s3cret"))).await);
            assert!(auth.lock_verified().contains_key("prom"));
            assert!(auth.allows(Some(&header("prom", "s3cret"))).await);
            assert!(!auth.allows(Some(&header("prom", "wrong"))).await);
            assert!(!auth.allows(Some(&header("nobody", "s3cret"))).await);
            assert!(!auth.allows(Some(b"Bearer abc")).await);
            assert!(!auth.allows(Some(b"Basic !!!")).await);
            assert!(!auth.allows(None).await);
            // A user's right password still works after another's wrong one.
            assert!(auth.allows(Some(&header("prom", "s3cret"))).await);
        });
    }

    fn checks(auth: &BasicAuth) -> usize {
        auth.checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A repeated wrong password is answered from memory, without a check.
    #[test]
    fn a_repeated_failure_costs_no_check() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("prom".to_owned(), hash)].into()).unwrap();
        runtime().block_on(async {
            for _ in 0..100 {
                assert!(!auth.allows(Some(&header("prom", "guess"))).await);
            }
            assert_eq!((checks(&auth), auth.failures()), (1, 1));
            assert!(!auth.allows(Some(&header("prom", "another"))).await);
            assert_eq!(checks(&auth), 2);
            for _ in 0..10 {
                assert!(auth.allows(Some(&header("prom", "s3cret"))).await);
            }
            assert_eq!(checks(&auth), 3);
        });
    }

    /// An unknown user pays a check against a hash of the users' highest cost, so that
    /// timing does not tell who exists.
    #[test]
    fn an_unknown_user_costs_a_check_of_the_users_cost() {
        let (cheap, dear) = (bcrypt::hash("a", 4).unwrap(), bcrypt::hash("b", 6).unwrap());
        let auth =
            BasicAuth::new([("a".to_owned(), cheap), ("b".to_owned(), dear)].into()).unwrap();
        runtime().block_on(async {
            assert!(!auth.allows(Some(&header("nobody", "x"))).await);
            assert_eq!(checks(&auth), 1);
        });
        let decoy = auth
            .decoy
            .get()
            .unwrap()
            .parse::<bcrypt::HashParts>()
            .unwrap();
        assert_eq!(decoy.get_cost(), 6);
    }

    #[test]
    fn failures_kept_are_bounded() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("prom".to_owned(), hash)].into()).unwrap();
        for i in 0..FAILURES_KEPT + 10 {
            auth.remember_failure(digest("prom", &i.to_string()));
        }
        assert_eq!(auth.failures(), FAILURES_KEPT);
    }
}
