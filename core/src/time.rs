//! Engine time: an opaque microsecond counter the caller supplies, because core never reads a clock.

use core::ops::{Add, AddAssign};
pub use core::time::Duration;

/// A point in time, in microseconds since an origin the driver picks (for example the moment
/// it created the engine). Only differences matter; the engine never reads a clock itself.
///
/// ```
/// use hypha_rpc_core::time::{Duration, Instant};
/// let t0 = Instant::from_micros(0);
/// let t1 = t0 + Duration::from_millis(1500);
/// assert_eq!(t1.saturating_duration_since(t0), Duration::from_millis(1500));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The origin.
    pub const ZERO: Instant = Instant(0);

    /// `us` microseconds after the origin.
    pub const fn from_micros(us: u64) -> Instant {
        Instant(us)
    }
    /// Microseconds since the origin.
    pub const fn as_micros(self) -> u64 {
        self.0
    }
    /// How long after `earlier` this is, or zero if it is not later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    /// Saturates at the far future instead of overflowing.
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)))
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}
