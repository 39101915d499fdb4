//! The shell's time: [`Timestamp`], milliseconds since the Unix epoch, and [`wallclock_ms`], the one
//! place the controller's shell reads the wall clock.
//!
//! **Boundary:** only the shell (the API, the instance task, the introspection writer) reads the clock;
//! the instance core is handed the time (`InstanceCore::tick`, `advance_clock`) and never reads it, so the
//! simulator can drive it with its own.

/// The time type of the controller's shell: milliseconds since the Unix epoch.
pub type Timestamp = u64;

/// Milliseconds since the Unix epoch: the controller shell's clock (the core never reads it).
#[allow(clippy::disallowed_methods)]
pub fn wallclock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
