//! API keys revoked at run time (`POST /authn/revoke`), for the whole
//! process: kept across config reloads (which rebuild the key table), saved
//! to `[authn] revocations_file` on every revocation and read back at start,
//! and, with `[ratelimit.redis]`, shared with every gateway of the fleet
//! through a Redis set that the sync thread reads twice a second.
//!
//! A leaf module: authn asks [`is_revoked`] and [`add`]s; the Redis sync
//! [`take_unpublished`]es and hands back what the fleet revoked
//! ([`apply_remote`]), which reaches the key table in force through the hook
//! the server installs ([`set_hook`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, RwLock};

/// Called with each revocation learned from the fleet, to take the key out
/// of the table in force.
pub type Hook = Box<dyn Fn([u8; 32]) + Send + Sync>;

#[derive(Default)]
struct State {
    revoked: HashSet<[u8; 32]>,
    /// Revoked here, not yet written to Redis.
    unpublished: Vec<[u8; 32]>,
    file: Option<PathBuf>,
}

static STATE: LazyLock<RwLock<State>> = LazyLock::new(|| RwLock::new(State::default()));
static HOOK: LazyLock<Mutex<Option<Hook>>> = LazyLock::new(|| Mutex::new(None));

fn read() -> std::sync::RwLockReadGuard<'static, State> {
    STATE.read().unwrap_or_else(|p| p.into_inner())
}

fn write() -> std::sync::RwLockWriteGuard<'static, State> {
    STATE.write().unwrap_or_else(|p| p.into_inner())
}

/// Whether `digest` (SHA-256 of an API key) has been revoked.
pub fn is_revoked(digest: &[u8; 32]) -> bool {
    read().revoked.contains(digest)
}

/// Every revoked digest.
pub fn all() -> Vec<[u8; 32]> {
    read().revoked.iter().copied().collect()
}

/// Revoke `digest` here: remembered, queued for the fleet, saved to the
/// file. `Ok(false)`: it was revoked already. `Err`: revoked, but the file
/// could not be written (the revocation holds until a restart).
pub fn add(digest: [u8; 32]) -> Result<bool, String> {
    let mut st = write();
    if !st.revoked.insert(digest) {
        return Ok(false);
    }
    st.unpublished.push(digest);
    save_locked(&st).map(|()| true)
}

/// Read the file (missing: nothing revoked yet) and remember it for saving.
pub fn load(path: &Path) -> Result<usize, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.to_string()),
    };
    let mut st = write();
    if text.is_empty() && path.exists() {
        // Saves are atomic: an empty file was not written by the gateway,
        // and reading it as "nothing revoked" would un-revoke every key.
        return Err("the file is empty".into());
    }
    st.file = Some(path.to_path_buf());
    if text.is_empty() {
        return Ok(0);
    }
    #[derive(serde::Deserialize)]
    struct File {
        revoked: Vec<String>,
    }
    let f: File = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    let mut n = 0;
    for h in &f.revoked {
        let d = crate::syntax::parse_hex32(h).ok_or_else(|| format!("`{h}` is not a SHA-256"))?;
        if st.revoked.insert(d) {
            n += 1;
            // Published again: one made while Redis was down reaches the
            // fleet after a restart (SADD is idempotent).
            st.unpublished.push(d);
        }
    }
    Ok(n)
}

fn save_locked(st: &State) -> Result<(), String> {
    let Some(path) = &st.file else {
        return Ok(());
    };
    let mut list: Vec<String> = st.revoked.iter().map(|d| crate::syntax::hex(d)).collect();
    list.sort();
    let text = serde_json::to_vec_pretty(&serde_json::json!({"version": 1, "revoked": list}))
        .map_err(|e| e.to_string())?;
    crate::syntax::write_durably(path, &text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Install the hook that applies the fleet's revocations to the key table.
pub fn set_hook(h: Hook) {
    *HOOK.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
}

/// Revocations made here since the last call, for the fleet.
pub fn take_unpublished() -> Vec<[u8; 32]> {
    std::mem::take(&mut write().unpublished)
}

/// Put back what could not be published (Redis unreachable).
pub fn unpublish(back: Vec<[u8; 32]>) {
    write().unpublished.extend(back);
}

/// The fleet's revoked set: the ones new here are remembered, saved, and
/// applied through the hook; returns how many were new.
pub fn apply_remote(fleet: impl IntoIterator<Item = [u8; 32]>) -> usize {
    let fresh: Vec<[u8; 32]> = {
        let mut st = write();
        let fresh: Vec<_> = fleet
            .into_iter()
            .filter(|d| st.revoked.insert(*d))
            .collect();
        if !fresh.is_empty() {
            if let Err(e) = save_locked(&st) {
                tracing::error!(error = %e, "cannot save the revoked API keys");
            }
        }
        fresh
    };
    if let Some(h) = HOOK.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        for d in &fresh {
            h(*d);
        }
    }
    fresh.len()
}
