//! Day and month quotas per tenant (UTC calendar windows), kept across
//! restarts in a local state file and, with Redis, shared by the fleet.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::{Level, Limit, Shown};

/// A tenant's long-window limits (0 = none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    pub requests_per_day: u64,
    pub tokens_per_day: u64,
    pub requests_per_month: u64,
    pub tokens_per_month: u64,
}

impl QuotaLimits {
    pub fn any(&self) -> bool {
        self.requests_per_day > 0
            || self.tokens_per_day > 0
            || self.requests_per_month > 0
            || self.tokens_per_month > 0
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// (year, month 1..=12) of a day number since 1970-01-01 (proleptic Gregorian).
pub fn civil(days: i64) -> (i64, u32) {
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// Day number of the first day of (year, month).
pub fn days_from_civil(y: i64, m: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The month index (year × 12 + month − 1) and the seconds the month spans and has left.
pub fn month_of(now: u64) -> (u64, u64, u64) {
    let day = (now / 86_400) as i64;
    let (y, m) = civil(day);
    let start = days_from_civil(y, m);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let next = days_from_civil(ny, nm);
    let next_s = next as u64 * 86_400;
    (
        (y * 12 + i64::from(m) - 1) as u64,
        (next - start) as u64 * 86_400,
        next_s - now,
    )
}

/// One tenant's counts in the current day and month.
#[derive(Debug, Default)]
pub struct QuotaState {
    day: AtomicU64,
    month: AtomicU64,
    /// day requests, day tokens, month requests, month tokens.
    counts: [AtomicU64; 4],
    /// Charged here and not yet pushed to Redis, same order.
    pub pending: [AtomicI64; 4],
}

/// What `charge` shows on success: (remaining, quota, window name, window s, reset s).
pub type QuotaShown = Option<(u64, u64, &'static str, u64, u64)>;

impl QuotaState {
    fn roll(&self, now: u64) {
        let day = now / 86_400;
        let d = self.day.load(Ordering::Acquire);
        if d != day
            && self
                .day
                .compare_exchange(d, day, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.counts[0].store(0, Ordering::Release);
            self.counts[1].store(0, Ordering::Release);
        }
        let (month, _, _) = month_of(now);
        let m = self.month.load(Ordering::Acquire);
        if m != month
            && self
                .month
                .compare_exchange(m, month, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.counts[2].store(0, Ordering::Release);
            self.counts[3].store(0, Ordering::Release);
        }
    }

    /// Charge one request of `tokens`; all-or-nothing.
    pub fn charge(
        &self,
        l: &QuotaLimits,
        requests: u64,
        tokens: u64,
        now: u64,
    ) -> Result<QuotaShown, (Limit, u64, Option<Shown>)> {
        self.roll(now);
        let (_, month_span, month_left) = month_of(now);
        let day_left = 86_400 - now % 86_400;
        let checks = [
            (
                l.requests_per_day,
                requests,
                Limit::RequestsPerDay,
                day_left,
                86_400,
                "day",
            ),
            (
                l.tokens_per_day,
                tokens,
                Limit::TokensPerDay,
                day_left,
                86_400,
                "day",
            ),
            (
                l.requests_per_month,
                requests,
                Limit::RequestsPerMonth,
                month_left,
                month_span,
                "month",
            ),
            (
                l.tokens_per_month,
                tokens,
                Limit::TokensPerMonth,
                month_left,
                month_span,
                "month",
            ),
        ];
        let mut shown: QuotaShown = None;
        for (i, (limit, amount, which, left, span, name)) in checks.into_iter().enumerate() {
            if limit == 0 {
                continue;
            }
            let after = self.counts[i].fetch_add(amount, Ordering::AcqRel) + amount;
            if after > limit && amount > 0 {
                // Undo this and every earlier charge.
                for (j, c) in checks.iter().enumerate().take(i + 1) {
                    if c.0 > 0 {
                        self.counts[j].fetch_sub(c.1, Ordering::AcqRel);
                    }
                }
                let show = (i % 2 == 0).then_some(Shown {
                    level: Level::Tenant,
                    window: name,
                    quota: limit,
                    window_s: span,
                    remaining: 0,
                    reset_s: left,
                });
                return Err((which, left, show));
            }
            if i % 2 == 0 {
                let rem = limit.saturating_sub(after);
                if shown.is_none_or(|s| {
                    rem.saturating_mul(1_000_000) / limit
                        < s.0.saturating_mul(1_000_000) / s.1.max(1)
                }) {
                    shown = Some((rem, limit, name, span, left));
                }
            }
        }
        for (i, a) in [requests, tokens, requests, tokens].into_iter().enumerate() {
            self.pending[i].fetch_add(a as i64, Ordering::Relaxed);
        }
        Ok(shown)
    }

    /// Tokens left in the tightest token quota (`None`: none is set).
    pub fn tokens_left(&self, l: &QuotaLimits) -> Option<u64> {
        [(l.tokens_per_day, 1), (l.tokens_per_month, 3)]
            .into_iter()
            .filter(|(limit, _)| *limit > 0)
            .map(|(limit, i)| limit.saturating_sub(self.counts[i].load(Ordering::Acquire)))
            .min()
    }

    /// Give back `requests` and `tokens` (negative tokens: charge more).
    pub fn refund(&self, requests: u64, tokens: i64) {
        for (i, a) in [requests as i64, tokens, requests as i64, tokens]
            .into_iter()
            .enumerate()
        {
            if a == 0 {
                continue;
            }
            let _ = self.counts[i].fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| {
                Some(if a > 0 {
                    c.saturating_sub(a as u64)
                } else {
                    c.saturating_add(a.unsigned_abs())
                })
            });
            self.pending[i].fetch_sub(a, Ordering::Relaxed);
        }
    }

    /// The window ids and counts, for persistence and Redis.
    pub fn snapshot(&self) -> (u64, u64, [u64; 4]) {
        (
            self.day.load(Ordering::Acquire),
            self.month.load(Ordering::Acquire),
            std::array::from_fn(|i| self.counts[i].load(Ordering::Acquire)),
        )
    }

    /// Set the counts from the fleet's totals (Redis), keeping what was charged here since.
    pub fn set_from_fleet(&self, totals: [u64; 4], since: [i64; 4]) {
        for i in 0..4 {
            self.counts[i].store(
                (totals[i] as i64).saturating_add(since[i]).max(0) as u64,
                Ordering::Release,
            );
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    day: u64,
    day_requests: u64,
    day_tokens: u64,
    month: u64,
    month_requests: u64,
    month_tokens: u64,
}

/// Every tenant's quota state.
pub struct Quotas {
    map: DashMap<Box<str>, Arc<QuotaState>, foldhash::fast::RandomState>,
    max_keys: usize,
    overflow: Arc<QuotaState>,
}

impl Quotas {
    pub fn new(max_keys: usize) -> Quotas {
        Quotas {
            map: DashMap::with_hasher(Default::default()),
            max_keys,
            overflow: Arc::new(QuotaState::default()),
        }
    }

    pub fn state(&self, tenant: &str) -> Arc<QuotaState> {
        if let Some(s) = self.map.get(tenant) {
            return s.clone();
        }
        if self.map.len() >= self.max_keys {
            return self.overflow.clone();
        }
        self.map.entry(tenant.into()).or_default().clone()
    }

    /// Forget tenants whose day and month are both over.
    pub fn sweep(&self, now: u64) {
        let day = now / 86_400;
        let (month, _, _) = month_of(now);
        self.map.retain(|_, s| {
            Arc::strong_count(s) > 1
                || s.day.load(Ordering::Relaxed) == day
                || s.month.load(Ordering::Relaxed) == month
        });
    }

    /// Zero a tenant's counts; false when it has none.
    pub fn reset(&self, tenant: &str) -> bool {
        match self.map.get(tenant) {
            Some(st) => {
                for i in 0..4 {
                    // Redis: push the negative of what is counted, so the fleet's count drops too.
                    let had = st.counts[i].swap(0, Ordering::AcqRel);
                    st.pending[i].fetch_sub(had as i64, Ordering::AcqRel);
                }
                true
            }
            None => false,
        }
    }

    pub fn tenants(&self) -> Vec<(String, Arc<QuotaState>)> {
        self.map
            .iter()
            .map(|e| (e.key().to_string(), e.value().clone()))
            .collect()
    }

    /// Write every tenant's counts (atomically: a temporary file renamed over).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let all: std::collections::BTreeMap<String, Saved> = self
            .map
            .iter()
            .map(|e| {
                let (day, month, c) = e.value().snapshot();
                (
                    e.key().to_string(),
                    Saved {
                        day,
                        day_requests: c[0],
                        day_tokens: c[1],
                        month,
                        month_requests: c[2],
                        month_tokens: c[3],
                    },
                )
            })
            .collect();
        let text = serde_json::to_vec_pretty(&serde_json::json!({ "version": 1, "tenants": all }))
            .map_err(std::io::Error::other)?;
        crate::syntax::write_durably(path, &text)
    }

    /// Load saved counts (those of the current day / month only). A missing
    /// file is an empty state; an unreadable one an error.
    pub fn load(&self, path: &Path, now: u64) -> std::io::Result<usize> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        #[derive(Deserialize)]
        struct File {
            tenants: std::collections::BTreeMap<String, Saved>,
        }
        let f: File = serde_json::from_slice(&text).map_err(std::io::Error::other)?;
        let day = now / 86_400;
        let (month, _, _) = month_of(now);
        let mut n = 0;
        for (t, s) in f.tenants {
            let st = self.state(&t);
            st.day.store(day, Ordering::Release);
            st.month.store(month, Ordering::Release);
            if s.day == day {
                st.counts[0].store(s.day_requests, Ordering::Release);
                st.counts[1].store(s.day_tokens, Ordering::Release);
            }
            if s.month == month {
                st.counts[2].store(s.month_requests, Ordering::Release);
                st.counts[3].store(s.month_tokens, Ordering::Release);
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        // 2026-11-22 = day 20779; November began on day 20758, December on 20788.
        assert_eq!(civil(20_779), (2026, 11));
        assert_eq!(days_from_civil(2026, 11), 20_758);
        assert_eq!(civil(days_from_civil(2024, 2) + 28), (2024, 2), "leap day");
        assert_eq!(civil(days_from_civil(2024, 3)), (2024, 3));
        let now = 20_779 * 86_400 + 3600;
        let (m, span, left) = month_of(now);
        assert_eq!(m, 2026 * 12 + 10);
        assert_eq!(span, 30 * 86_400);
        assert_eq!(left, (20_788 - 20_779) * 86_400 - 3600);
    }

    #[test]
    fn day_quota_refuses_then_resets_next_day() {
        let q = QuotaState::default();
        let l = QuotaLimits {
            requests_per_day: 2,
            tokens_per_month: 1000,
            ..Default::default()
        };
        let now = 20_779 * 86_400 + 10;
        assert!(q.charge(&l, 1, 100, now).is_ok());
        let shown = q.charge(&l, 1, 100, now).unwrap();
        assert_eq!(shown.map(|s| (s.0, s.1, s.2)), Some((0, 2, "day")));
        let (limit, retry, _) = q.charge(&l, 1, 100, now).unwrap_err();
        assert_eq!(limit, Limit::RequestsPerDay);
        assert_eq!(retry, 86_400 - 10);
        // Nothing of the refused request stayed charged.
        assert_eq!(q.snapshot().2, [2, 0, 0, 200]);
        assert!(q.charge(&l, 1, 100, now + 86_400).is_ok(), "a new day");
        assert_eq!(q.snapshot().2[3], 300, "the month goes on");
        let (limit, _, _) = q.charge(&l, 1, 800, now + 86_400).unwrap_err();
        assert_eq!(limit, Limit::TokensPerMonth);
    }

    #[test]
    fn saved_and_loaded() {
        let dir = std::env::temp_dir().join(format!("gw-quota-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.json");
        let now = now_unix();
        let a = Quotas::new(10);
        let l = QuotaLimits {
            requests_per_day: 100,
            tokens_per_month: 10_000,
            ..Default::default()
        };
        a.state("acme").charge(&l, 1, 42, now).unwrap();
        a.state("acme").charge(&l, 1, 8, now).unwrap();
        a.save(&path).unwrap();
        let b = Quotas::new(10);
        assert_eq!(b.load(&path, now).unwrap(), 1);
        assert_eq!(b.state("acme").snapshot().2, [2, 0, 0, 50]);
        // A file from another day keeps only the month.
        let c = Quotas::new(10);
        c.load(&path, now + 86_400 * 40).unwrap();
        assert_eq!(c.state("acme").snapshot().2, [0, 0, 0, 0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
