//! A LoRA adapter bound to a base model: PEFT's `adapter_model.safetensors` read into one
//! `(A, B)` pair per linear layer of the base, checked against the base's shapes, and written
//! back in the same format.

use super::config::{adapter_dir, AdapterConfig};
use crate::checkpoint::safetensors::TensorFile;
use crate::checkpoint::writer::{write_atomic, write_bytes_atomic};
use crate::error::{Result, TernError};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// File names PEFT uses.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file PEFT writes by default.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The weights file of adapters saved before safetensors (a torch.save pickle).
pub const LEGACY_WEIGHTS_FILE: &str = "adapter_model.bin";
/// PEFT's prefix on every tensor name of a causal-LM adapter.
const PEFT_PREFIX: &str = "base_model.model.";

/// One linear layer of the base model that an adapter may attach to.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Hugging Face module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// Output features.
    pub out_dim: usize,
    /// Input features.
    pub in_dim: usize,
    /// Whether this is the output head (PEFT's `all-linear` leaves it out).
    pub is_head: bool,
}

/// The base model's linear layers, numbered; adapters store their weights by this number so
/// a forward pass finds a layer's pair with one index, not a name lookup.
#[derive(Debug, Clone, Default)]
pub struct SlotTable {
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
}

impl SlotTable {
    /// Adds a layer; returns its slot number.
    pub fn push(&mut self, name: &str, out_dim: usize, in_dim: usize, is_head: bool) -> usize {
        let i = self.slots.len();
        self.slots.push(Slot {
            name: name.to_string(),
            out_dim,
            in_dim,
            is_head,
        });
        self.index.insert(name.to_string(), i);
        i
    }

    /// The slot number of a module name.
    pub fn get(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slot `i`.
    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i]
    }

    /// All slots in order.
    pub fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter()
    }
}

/// The LoRA weights of one module: `delta(x) = scale * (x A^T) B^T`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `A`, `[r, in]`.
    pub a: Tensor,
    /// `B` transposed, `[r, out]`, contiguous: the expand step reads it row by row.
    pub bt: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scale: f64,
}

impl LoraPair {
    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `B`, `[out, r]`.
    pub fn b(&self) -> Result<Tensor> {
        Ok(self.bt.t()?.contiguous()?)
    }

    /// The dense update `scale * B A`, `[out, in]`, in f32 (for merging).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let b = self.b()?.to_dtype(DType::F32)?;
        let a = self.a.to_dtype(DType::F32)?;
        Ok((b.matmul(&a)? * self.scale)?)
    }
}

static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// A LoRA adapter bound to one base model's slot table.
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    version: u64,
    source: Option<PathBuf>,
    config: AdapterConfig,
    pairs: Vec<Option<LoraPair>>,
    /// `(module name, slot)` of every pair, in name order.
    modules: Vec<(String, usize)>,
    bytes: usize,
}

fn bad(path: &Path, detail: String) -> TernError {
    TernError::Adapter {
        path: path.to_path_buf(),
        detail,
    }
}

/// Which half of a pair a tensor is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Half {
    A,
    B,
}

/// Splits a PEFT tensor name into module name, half, and the adapter name embedded in it
/// (PEFT writes `…q_proj.lora_A.weight`; in-memory state dicts carry `.lora_A.default.weight`).
fn parse_key(file: &Path, key: &str) -> Result<(String, Half, Option<String>)> {
    let k = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    for (marker, what) in [
        (".lora_embedding_A", "LoRA on an embedding"),
        (".lora_embedding_B", "LoRA on an embedding"),
        (".lora_magnitude_vector", "DoRA (a magnitude vector)"),
    ] {
        if k.contains(marker) {
            return Err(bad(file, format!("tensor `{key}`: {what} is not supported; merge the adapter in PEFT (merge_and_unload) and load the merged model")));
        }
    }
    for (marker, half) in [(".lora_A.", Half::A), (".lora_B.", Half::B)] {
        if let Some(pos) = k.find(marker) {
            let module = &k[..pos];
            let rest = &k[pos + marker.len()..];
            let name = match rest {
                "weight" => None,
                r => match r.strip_suffix(".weight") {
                    Some(n) if !n.contains('.') => Some(n.to_string()),
                    _ => {
                        return Err(bad(file, format!("tensor `{key}`: only `.weight` LoRA tensors are supported (a bias on lora_B is not)")))
                    }
                },
            };
            return Ok((module.to_string(), half, name));
        }
    }
    Err(bad(file, format!("tensor `{key}` is not a LoRA weight (lora_A/lora_B); adapters that also save whole modules (modules_to_save) are not supported")))
}

impl LoraAdapter {
    /// Reads a PEFT adapter directory (or its `adapter_config.json` / safetensors file) and
    /// binds it to `slots`, converting its weights to `dtype` on `device`.
    pub fn load(
        path: &Path,
        name: &str,
        slots: &SlotTable,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = adapter_dir(path);
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.is_file() {
            return Err(TernError::MissingFile {
                path: cfg_path,
                hint: "a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors; pass that directory".into(),
            });
        }
        let config = AdapterConfig::from_file(&cfg_path)?;
        if config.fan_in_fan_out {
            tracing::warn!(
                "{}: fan_in_fan_out is for Conv1D layers; ignored on Linear layers, as PEFT does",
                cfg_path.display()
            );
        }
        let mut w_path = dir.join(WEIGHTS_FILE);
        if !w_path.is_file() && dir.join(LEGACY_WEIGHTS_FILE).is_file() {
            w_path = dir.join(LEGACY_WEIGHTS_FILE); // read without executing its pickle
        }
        if !w_path.is_file() {
            return Err(TernError::MissingFile {
                path: w_path,
                hint: "the adapter's weights are missing (adapter_model.safetensors or adapter_model.bin)".into(),
            });
        }
        let file = TensorFile::open(&w_path)?;
        let mut halves: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
        let mut adapter_name: Option<String> = None;
        for key in file.entries().keys() {
            let (module, half, embedded) = parse_key(&w_path, key)?;
            if let Some(n) = embedded {
                match &adapter_name {
                    Some(prev) if *prev != n => {
                        return Err(bad(&w_path, format!("the file holds two adapters (`{prev}` and `{n}`); save each adapter to its own directory")))
                    }
                    _ => adapter_name = Some(n),
                }
            }
            halves.entry(module).or_default()[half as usize] = Some(key.clone());
        }
        let mut pairs: Vec<Option<LoraPair>> = vec![None; slots.len()];
        let mut modules = Vec::new();
        let mut bytes = 0usize;
        for (module, [a_key, b_key]) in halves {
            let (Some(a_key), Some(b_key)) = (a_key, b_key) else {
                return Err(bad(
                    &w_path,
                    format!("module `{module}` has only one of lora_A / lora_B"),
                ));
            };
            let Some(slot) = slots.get(&module) else {
                return Err(bad(&w_path, format!("the adapter has weights for `{module}`, which the base model does not have as a linear layer (was it trained on another architecture?)")));
            };
            let s = slots.slot(slot);
            if !config.targets(&module, s.is_head) {
                tracing::warn!("{}: `{module}` has weights but adapter_config.json does not target it; ignored, as PEFT does", w_path.display());
                continue;
            }
            let a_shape = &file.entries()[&a_key].shape;
            let b_shape = &file.entries()[&b_key].shape;
            let r = config.rank_for(&module);
            if a_shape.as_slice() != [r, s.in_dim] || b_shape.as_slice() != [s.out_dim, r] {
                return Err(bad(&w_path, format!(
                    "module `{module}`: lora_A is {a_shape:?} and lora_B is {b_shape:?}, but the base's weight is [{}, {}] and the config's rank is {r}, so they must be [{r}, {}] and [{}, {r}] (adapter made for another model?)",
                    s.out_dim, s.in_dim, s.in_dim, s.out_dim
                )));
            }
            let a = file.tensor(&a_key, dtype, device)?;
            let bt = file.tensor(&b_key, dtype, device)?.t()?.contiguous()?;
            bytes += (a.elem_count() + bt.elem_count()) * dtype.size_in_bytes();
            pairs[slot] = Some(LoraPair {
                a,
                bt,
                scale: config.scale_for(&module),
            });
            modules.push((module, slot));
        }
        if modules.is_empty() {
            return Err(bad(
                &w_path,
                "the adapter has no LoRA weights for any linear layer of this model".into(),
            ));
        }
        Ok(Self {
            name: name.to_string(),
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            source: Some(dir),
            config,
            pairs,
            modules,
            bytes,
        })
    }

    /// Builds an adapter from `(module, A [r, in], B^T [r, out])` taken as they are, so the
    /// tensors can be training variables (a transposed copy would cut their gradients).
    pub fn from_pairs(
        name: &str,
        config: AdapterConfig,
        slots: &SlotTable,
        pairs_in: Vec<(String, Tensor, Tensor)>,
    ) -> Result<Self> {
        let here = Path::new(name);
        let mut pairs: Vec<Option<LoraPair>> = vec![None; slots.len()];
        let mut modules = Vec::new();
        let mut bytes = 0;
        for (module, a, bt) in pairs_in {
            let slot = slots.get(&module).ok_or_else(|| {
                bad(
                    here,
                    format!("no linear layer `{module}` in the base model"),
                )
            })?;
            let s = slots.slot(slot);
            let r = a.dims()[0];
            if a.dims() != [r, s.in_dim] || bt.dims() != [r, s.out_dim] {
                return Err(bad(
                    here,
                    format!(
                        "module `{module}`: A {:?} / B^T {:?} do not fit [{}, {}]",
                        a.dims(),
                        bt.dims(),
                        s.out_dim,
                        s.in_dim
                    ),
                ));
            }
            bytes += (a.elem_count() + bt.elem_count()) * a.dtype().size_in_bytes();
            pairs[slot] = Some(LoraPair {
                scale: config.scale_for(&module),
                a,
                bt,
            });
            modules.push((module, slot));
        }
        modules.sort();
        Ok(Self {
            name: name.to_string(),
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            source: None,
            config,
            pairs,
            modules,
            bytes,
        })
    }

    /// Builds an adapter from pairs `(module, A [r, in], B [out, r])` (tests, benchmarks).
    pub fn from_tensors(
        name: &str,
        config: AdapterConfig,
        slots: &SlotTable,
        tensors: Vec<(String, Tensor, Tensor)>,
    ) -> Result<Self> {
        let pairs = tensors
            .into_iter()
            .map(|(m, a, b)| Ok((m, a, b.t()?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        Self::from_pairs(name, config, slots, pairs)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` to `dir` in PEFT's
    /// format (each file atomically), so PEFT, vLLM and mistral.rs can load it.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TernError::io(dir, e))?;
        let mut tensors = Vec::with_capacity(self.modules.len() * 2);
        for (m, p) in self.modules() {
            tensors.push((format!("{PEFT_PREFIX}{m}.lora_A.weight"), p.a.clone()));
            tensors.push((format!("{PEFT_PREFIX}{m}.lora_B.weight"), p.b()?));
        }
        write_atomic(&dir.join(WEIGHTS_FILE), &tensors)?;
        let json = serde_json::to_string_pretty(&self.config.to_json()).expect("json serialises");
        write_bytes_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// The registry name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A process-unique number: a reload of the same name gets a new one.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Where it was read from.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Its PEFT config.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The pair for slot `i`, if the adapter touches that layer.
    #[inline]
    pub fn pair(&self, slot: usize) -> Option<&LoraPair> {
        self.pairs.get(slot).and_then(Option::as_ref)
    }

    /// Module names it touches, with their pairs.
    pub fn modules(&self) -> impl Iterator<Item = (&str, &LoraPair)> {
        self.modules
            .iter()
            .filter_map(|(m, s)| Some((m.as_str(), self.pair(*s)?)))
    }

    /// Bytes of its weights.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
