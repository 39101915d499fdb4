//! A process's memory as Linux reports it in `/proc/PID/status`: the resident set now (`VmRSS`) and its
//! peak (`VmHWM`), for tests and benchmarks that bound or report what a process holds.
//!
//! **What this is not.** Not portable: on a system without `/proc` every function answers `None`.
//!
//! **Tests:** below (this process's own figures).

/// The value of `field` (a `kB` figure such as `VmRSS:`) in `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Process `pid`'s resident set now, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS:")
}

/// Process `pid`'s peak resident set, in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_set_no_larger_than_its_peak() {
        let pid = std::process::id();
        let (now, peak) = (rss_bytes(pid).unwrap(), peak_rss_bytes(pid).unwrap());
        assert!(now > 0 && now <= peak, "{now} > {peak}");
        assert_eq!(rss_bytes(u32::MAX), None, "no such process");
    }
}
