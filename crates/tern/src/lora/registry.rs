//! Adapters by name, loaded and dropped while generation runs.
//!
//! Activating a resident adapter is a hash lookup and an `Arc` clone under a read lock: the
//! caller then hands that `Arc` to the forward pass, so nothing in the model changes and
//! requests that already hold a version keep it until they finish, even if the name is
//! reloaded or unloaded meanwhile. A memory budget evicts the least recently used adapters
//! that no request holds; an evicted adapter stays registered and is read from disk again
//! the next time it is asked for.

use super::adapter::{LoraAdapter, SlotTable};
use crate::error::{Result, TernError};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Debug)]
struct Entry {
    path: PathBuf,
    adapter: Option<Arc<LoraAdapter>>,
    bytes: usize,
    last_used: AtomicU64,
}

/// What `list` reports for one adapter.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    /// Registry name.
    pub name: String,
    /// Where it is read from.
    pub path: PathBuf,
    /// Whether its weights are in memory.
    pub resident: bool,
    /// Bytes of its weights (as of the last load).
    pub bytes: usize,
    /// Version of the resident copy.
    pub version: Option<u64>,
}

/// Named adapters for one base model.
#[derive(Debug)]
pub struct AdapterRegistry {
    slots: SlotTable,
    dtype: DType,
    device: Device,
    budget: Option<usize>,
    entries: RwLock<HashMap<String, Entry>>,
    clock: AtomicU64,
}

impl AdapterRegistry {
    /// An empty registry for a model with these linear layers; adapter weights are kept in
    /// `dtype` on `device`; `budget` caps the bytes of resident adapters.
    pub fn new(slots: SlotTable, dtype: DType, device: Device, budget: Option<usize>) -> Self {
        Self {
            slots,
            dtype,
            device,
            budget,
            entries: RwLock::new(HashMap::new()),
            clock: AtomicU64::new(0),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the adapter at `path` and registers it as `name`, replacing any adapter of that
    /// name (requests holding the old version keep it). The files are read without holding
    /// the lock, so generation never waits on the disk.
    pub fn load(&self, name: &str, path: &Path) -> Result<Arc<LoraAdapter>> {
        if name.is_empty() {
            return Err(TernError::InvalidArgument(
                "adapter name must not be empty".into(),
            ));
        }
        let adapter = Arc::new(LoraAdapter::load(
            path,
            name,
            &self.slots,
            self.dtype,
            &self.device,
        )?);
        self.insert(name, path, adapter.clone())?;
        Ok(adapter)
    }

    fn insert(&self, name: &str, path: &Path, adapter: Arc<LoraAdapter>) -> Result<()> {
        let bytes = adapter.bytes();
        let mut map = self.write();
        if let Some(budget) = self.budget {
            // Bytes resident besides the copy of `name` being replaced.
            let others = |map: &HashMap<String, Entry>| -> usize {
                map.iter()
                    .filter(|(n, e)| *n != name && e.adapter.is_some())
                    .map(|(_, e)| e.bytes)
                    .sum()
            };
            let before = others(&map);
            if before + bytes > budget {
                evict_lru(&mut map, before + bytes - budget, name);
            }
            let now = others(&map);
            if now + bytes > budget {
                return Err(TernError::InvalidArgument(format!(
                    "adapter `{name}` needs {bytes} bytes but only {} of the {budget}-byte adapter budget can be freed (the rest is in use); raise the budget or unload adapters",
                    budget.saturating_sub(now)
                )));
            }
        }
        map.insert(
            name.to_string(),
            Entry {
                path: path.to_path_buf(),
                adapter: Some(adapter),
                bytes,
                last_used: AtomicU64::new(self.tick()),
            },
        );
        Ok(())
    }

    /// The current version of `name`: a pointer copy when resident, a read from disk when
    /// it was evicted.
    pub fn get(&self, name: &str) -> Result<Arc<LoraAdapter>> {
        let path = {
            let map = self.read();
            match map.get(name) {
                Some(e) => {
                    e.last_used.store(self.tick(), Ordering::Relaxed);
                    if let Some(a) = &e.adapter {
                        return Ok(a.clone());
                    }
                    e.path.clone()
                }
                None => return Err(self.unknown(&map, name)),
            }
        };
        tracing::info!(
            "adapter `{name}` was evicted; reading it again from {}",
            path.display()
        );
        self.load(name, &path)
    }

    /// Removes `name`; requests holding it finish with their copy.
    pub fn unload(&self, name: &str) -> Result<()> {
        let mut map = self.write();
        match map.remove(name) {
            Some(_) => Ok(()),
            None => Err(self.unknown(&map, name)),
        }
    }

    /// Every registered adapter, by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let map = self.read();
        let mut v: Vec<AdapterInfo> = map
            .iter()
            .map(|(n, e)| AdapterInfo {
                name: n.clone(),
                path: e.path.clone(),
                resident: e.adapter.is_some(),
                bytes: e.bytes,
                version: e.adapter.as_ref().map(|a| a.version()),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Bytes of the adapters in memory.
    pub fn resident_bytes(&self) -> usize {
        self.read()
            .values()
            .filter(|e| e.adapter.is_some())
            .map(|e| e.bytes)
            .sum()
    }

    fn unknown(&self, map: &HashMap<String, Entry>, name: &str) -> TernError {
        let mut known: Vec<&str> = map.keys().map(String::as_str).collect();
        known.sort();
        TernError::UnknownAdapter {
            name: name.to_string(),
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        }
    }
}

/// Drops the weights of least recently used adapters that no request holds until `need`
/// bytes are freed (or nothing more can be).
fn evict_lru(map: &mut HashMap<String, Entry>, need: usize, keep: &str) {
    let mut candidates: Vec<(u64, String)> = map
        .iter()
        .filter(|(n, e)| {
            *n != keep
                && e.adapter
                    .as_ref()
                    .is_some_and(|a| Arc::strong_count(a) == 1)
        })
        .map(|(n, e)| (e.last_used.load(Ordering::Relaxed), n.clone()))
        .collect();
    candidates.sort();
    let mut freed = 0;
    for (_, n) in candidates {
        if freed >= need {
            break;
        }
        if let Some(e) = map.get_mut(&n) {
            tracing::info!(
                "evicting adapter `{n}` ({} bytes) to stay within the budget",
                e.bytes
            );
            freed += e.bytes;
            e.adapter = None;
        }
    }
}
