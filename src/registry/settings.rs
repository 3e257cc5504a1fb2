//! The settings of one ordering domain, in the one form that the layer checks and the
//! shards enforce.

use std::fmt;

use crate::trace::Domain;

/// Stands for "no limit" in `max_queue_per_key` and `max_keys`.
pub(crate) const UNBOUNDED: usize = usize::MAX;

/// The settings of one ordering domain. The layer's setters check each value once; every
/// shard keeps a copy beside its lock, where its requests read it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Requests of one key between their inner call and their completion at once; at
    /// least 1.
    pub(crate) permits_per_key: u32,
    /// Requests of one key that may wait for a permit; [`UNBOUNDED`] by default.
    pub(crate) max_queue_per_key: usize,
    /// Keys that may be live at once; at least 1, [`UNBOUNDED`] by default.
    pub(crate) max_keys: usize,
    /// `Mode::Sync` and `Mode::SyncAll` requests of the domain between their inner call
    /// and their completion at once; [`UNBOUNDED`] by default.
    pub(crate) max_in_flight: usize,
    /// The `domain` label of the domain's metrics; nothing without the `metrics` feature.
    pub(crate) metrics_domain: Domain,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            permits_per_key: 1,
            max_queue_per_key: UNBOUNDED,
            max_keys: UNBOUNDED,
            max_in_flight: UNBOUNDED,
            metrics_domain: Domain::NONE,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Limit(usize);
        impl fmt::Debug for Limit {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0 {
                    UNBOUNDED => f.write_str("unbounded"),
                    limit => limit.fmt(f),
                }
            }
        }
        let mut settings = f.debug_struct("Settings");
        settings
            .field("permits_per_key", &self.permits_per_key)
            .field("max_queue_per_key", &Limit(self.max_queue_per_key))
            .field("max_keys", &Limit(self.max_keys))
            .field("max_in_flight", &Limit(self.max_in_flight));
        #[cfg(feature = "metrics")]
        settings.field("metrics_domain", &self.metrics_domain);
        settings.finish()
    }
}
