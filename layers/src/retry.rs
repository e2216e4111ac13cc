//! A retry budget: retries may be at most a share of requests, so that a failing fleet is not
//! hit by a retry storm.
//!
//! Every request deposits `percent` hundredths of a retry; every retry withdraws a whole one. The
//! balance starts at `reserve` retries and never grows past it (nor past one retry, when the
//! reserve is 0), so after a calm hour an outage still gets at most `reserve` retries up front
//! and then `percent`% of the requests. It is a single atomic: no lock and no clock on the
//! request path.

use std::sync::atomic::{AtomicI64, Ordering};

/// Hundredths of a retry per whole retry.
const WHOLE: i64 = 100;

/// Caps retries at `reserve` plus `percent`% of requests; see the module docs.
#[derive(Debug)]
pub struct RetryBudget {
    /// In hundredths of a retry.
    balance: AtomicI64,
    per_request: i64,
    cap: i64,
}

impl RetryBudget {
    /// A budget allowing `reserve` retries at once, and `percent` retries per 100 requests after.
    pub fn new(reserve: u32, percent: u32) -> Self {
        let start = i64::from(reserve) * WHOLE;
        // Deposits must be able to add up to one whole retry, or `percent` would mean nothing.
        let cap = if percent > 0 { start.max(WHOLE) } else { start };
        Self {
            balance: AtomicI64::new(start),
            per_request: i64::from(percent),
            cap,
        }
    }

    /// Counts one request.
    pub fn deposit(&self) {
        // A full budget is the common case; reading it keeps the cache line shared.
        if self.per_request == 0 || self.balance.load(Ordering::Relaxed) >= self.cap {
            return;
        }
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b < self.cap).then(|| (b + self.per_request).min(self.cap))
            });
    }

    /// Takes one retry if the budget has one.
    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= WHOLE).then(|| b - WHOLE)
            })
            .is_ok()
    }

    /// Gives back a retry taken with [`RetryBudget::withdraw`] and not used.
    pub fn refund(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + WHOLE).min(self.cap))
            });
    }

    /// Whole retries available now.
    pub fn available(&self) -> u64 {
        u64::try_from(self.balance.load(Ordering::Relaxed) / WHOLE).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_spent_first_and_then_a_share_of_requests() {
        let budget = RetryBudget::new(3, 20);
        assert_eq!(budget.available(), 3);
        assert!((0..3).all(|_| budget.withdraw()));
        assert!(!budget.withdraw(), "the reserve is spent");
        // Every request fails and asks for a retry: one in five gets it.
        let retried = (0..100)
            .filter(|_| {
                budget.deposit();
                budget.withdraw()
            })
            .count();
        assert_eq!(retried, 20);
    }

    #[test]
    fn calm_traffic_never_banks_more_than_the_reserve() {
        let budget = RetryBudget::new(2, 50);
        for _ in 0..10_000 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 2);
        assert!(budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[test]
    fn without_a_reserve_the_share_of_requests_still_applies() {
        let budget = RetryBudget::new(0, 50);
        assert!(!budget.withdraw());
        budget.deposit();
        budget.deposit();
        assert!(budget.withdraw(), "two requests at 50% earn one retry");
        assert!(!budget.withdraw());
        budget.refund();
        assert!(budget.withdraw(), "a refunded retry can be taken again");
    }

    #[test]
    fn a_zero_budget_never_retries() {
        let budget = RetryBudget::new(0, 0);
        budget.deposit();
        assert!(!budget.withdraw());
    }
}
