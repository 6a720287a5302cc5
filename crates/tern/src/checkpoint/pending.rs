//! Temp files and directories the atomic writers have in flight, so that an interrupt
//! (Ctrl-C) can remove them: a killed process runs no destructors, and each interrupted
//! quantize, merge or convert had left a `.NAME.tmp-*` of up to the model's size beside its
//! output.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Registers a temp path for as long as it lives.
#[derive(Debug)]
pub(crate) struct Pending(PathBuf);

impl Pending {
    /// Registers `path` (before it is created where the caller can, so an interrupt does
    /// not miss it).
    pub(crate) fn new(path: &Path) -> Self {
        lock().push(path.to_path_buf());
        Self(path.to_path_buf())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut v = lock();
        if let Some(i) = v.iter().position(|p| *p == self.0) {
            v.swap_remove(i);
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes every temp file and directory in flight, for an interrupt handler that ends the
/// process right after: the registry stays locked, so a writer that starts meanwhile waits
/// instead of leaving a new one behind.
pub fn remove_pending() {
    let v = lock();
    v.iter().for_each(|p| remove(p));
    std::mem::forget(v);
}

/// Removes a temp directory or file, whichever `p` is (or nothing, if it is gone).
fn remove(p: &Path) {
    let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registered path is removed (file or directory), one dropped before is left alone.
    #[test]
    fn what_is_in_flight_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let (f, g, done) = (
            d.path().join("f"),
            d.path().join("g"),
            d.path().join("done"),
        );
        let (_pf, _pg) = (Pending::new(&f), Pending::new(&g));
        std::fs::write(&f, b"x").unwrap();
        std::fs::create_dir_all(g.join("sub")).unwrap();
        drop(Pending::new(&done));
        std::fs::write(&done, b"x").unwrap();
        // As the handler would, but without keeping the registry locked for the other tests.
        lock()
            .iter()
            .filter(|p| p.starts_with(d.path()))
            .for_each(|p| remove(p));
        assert!(!f.exists() && !g.exists() && done.exists());
    }
}
