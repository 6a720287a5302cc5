//! Measurements behind `tern bench`: each returns plain numbers; printing is the CLI's job.

pub mod adapters;
pub mod batch;
pub mod generate;
pub mod prefix;
pub mod quality;
pub mod train;

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
