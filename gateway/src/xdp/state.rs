//! `[xdp] state_file`: the run-time blocks (admin API, CLI, rate-limit
//! escalation) with their expiry in Unix seconds, so a restart — or a new
//! process started beside the old one — drops the same clients. Config
//! blocks are not saved (the config lists them).

use std::net::IpAddr;
use std::path::Path;

use gateway_common::BlockReason;
use serde::{Deserialize, Serialize};

/// One saved block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    pub addr: IpAddr,
    pub reason: BlockReason,
    pub expires_unix_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    addr: IpAddr,
    reason: String,
    expires_unix_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    blocks: Vec<Entry>,
}

/// Wall-clock milliseconds (monotonic time doesn't survive a reboot).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Write atomically (a temporary file renamed over the old one).
pub fn save(path: &Path, blocks: &[Saved]) -> std::io::Result<()> {
    let f = File {
        version: 1,
        blocks: blocks
            .iter()
            .map(|b| Entry {
                addr: b.addr,
                reason: b.reason.as_str().to_string(),
                expires_unix_ms: b.expires_unix_ms,
            })
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&f).map_err(std::io::Error::other)?;
    crate::syntax::write_durably(path, &text)
}

/// The saved blocks; a missing file is none, an unreadable one an error.
pub fn load(path: &Path) -> Result<Vec<Saved>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    if text.is_empty() {
        // Saves are atomic: an empty file was not written by the gateway.
        return Err("the file is empty".into());
    }
    let f: File = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    f.blocks
        .into_iter()
        .map(|e| {
            let reason = BlockReason::ALL
                .into_iter()
                .find(|r| r.as_str() == e.reason && *r != BlockReason::Config)
                .ok_or_else(|| format!("unknown block reason `{}`", e.reason))?;
            Ok(Saved {
                addr: e.addr,
                reason,
                expires_unix_ms: e.expires_unix_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_blocks_read_back() {
        let dir = std::env::temp_dir().join(format!("gw-xdp-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blocks.json");
        assert_eq!(
            load(&path).unwrap(),
            Vec::new(),
            "missing: nothing saved yet"
        );
        let blocks = vec![
            Saved {
                addr: "203.0.113.7".parse().unwrap(),
                reason: BlockReason::Manual,
                expires_unix_ms: 2_000_000_000_000,
            },
            Saved {
                addr: "2001:db8::bad".parse().unwrap(),
                reason: BlockReason::RateLimit,
                expires_unix_ms: 2_000_000_500_000,
            },
        ];
        save(&path, &blocks).unwrap();
        assert_eq!(load(&path).unwrap(), blocks);
        std::fs::write(
            &path,
            br#"{"version":1,"blocks":[{"addr":"1.2.3.4","reason":"config","expires_unix_ms":1}]}"#,
        )
        .unwrap();
        assert!(load(&path).unwrap_err().contains("config"));
        std::fs::write(&path, b"{").unwrap();
        assert!(load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
