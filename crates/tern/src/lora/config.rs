//! `adapter_config.json` as PEFT writes it: which modules an adapter targets, with what rank
//! and alpha, and the refusal of PEFT features whose math tern does not implement.
//!
//! Matching follows PEFT 0.21 exactly (`check_target_module_exists`, `get_pattern_key`): a
//! target list matches a module whose name equals an entry or ends with `.entry`; a target
//! string is a regex that must match the whole name; `rank_pattern`/`alpha_pattern` keys
//! match a name's tail (`(.*\.)?(key)$`), first key in file order wins.

use crate::error::{Result, TernError};
use regex::Regex;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// Which modules an adapter applies to.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Names or name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// A regex the whole module name must match.
    Regex(Regex),
    /// PEFT's `all-linear`: every linear layer except the output head.
    AllLinear,
}

/// Modules excluded even when targeted.
#[derive(Debug, Clone)]
pub enum Excludes {
    /// Nothing excluded.
    None,
    /// Names or name suffixes.
    List(Vec<String>),
    /// A regex the whole module name must match.
    Regex(Regex),
}

/// A parsed `adapter_config.json`.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Targeted modules.
    pub target_modules: Targets,
    /// Excluded modules.
    pub exclude_modules: Excludes,
    /// Per-module ranks, in file order.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Only these layer indices are targeted (list targets only, as in PEFT).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Name of the layer list the index follows (`layers`), when given.
    pub layers_pattern: Vec<String>,
    /// The base model the adapter was trained on, as recorded.
    pub base_model_name_or_path: Option<String>,
    /// Dropout used in training (kept for training and for writing back).
    pub lora_dropout: f64,
    /// Set for GPT-2 style Conv1D layers; PEFT ignores it (with a warning) on Linear layers,
    /// which are all tern has, and so does tern.
    pub fan_in_fan_out: bool,
    rank_re: Vec<Regex>,
    alpha_re: Vec<Regex>,
    /// The file as read (or as built), written back on save so nothing is lost.
    raw: Map<String, Value>,
}

/// Fields that do not change the LoRA forward math, whatever their value.
const IGNORED: &[&str] = &[
    "task_type",
    "auto_mapping",
    "peft_version",
    "revision",
    "inference_mode",
    "lora_dropout",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "monteclora_config",
    "qalora_group_size",
    "ensure_weight_tying",
    "runtime_config",
    "fan_in_fan_out",
    "base_model_name_or_path",
    "peft_type",
    "init_lora_weights",
];

/// Fields tern reads.
const READ: &[&str] = &[
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "use_dora",
    "modules_to_save",
];

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
    }
}

/// A Python-style `re.fullmatch` regex.
fn full_regex(path: &Path, key: &str, pat: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pat})$"))
        .map_err(|e| bad(path, &format!("`{key}`: bad regex `{pat}`: {e}")))
}

fn bad(path: &Path, detail: &str) -> TernError {
    TernError::Adapter {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn strings(path: &Path, key: &str, v: &Value) -> Result<Vec<String>> {
    v.as_array()
        .ok_or_else(|| {
            bad(
                path,
                &format!("`{key}` must be a list of names or a regex string"),
            )
        })?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(path, &format!("`{key}` entries must be strings, got {x}")))
        })
        .collect()
}

fn suffix_match(list: &[String], module: &str) -> bool {
    list.iter()
        .any(|t| module == t || module.ends_with(&format!(".{t}")))
}

impl AdapterConfig {
    /// A fresh config as PEFT would write it for `LoraConfig(r, lora_alpha, target_modules)`.
    pub fn new(r: usize, lora_alpha: f64, target_modules: Targets) -> Self {
        let targets = match &target_modules {
            Targets::List(l) => json!(l),
            Targets::Regex(re) => {
                let s = re.as_str();
                json!(s
                    .strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(s))
            }
            Targets::AllLinear => json!("all-linear"),
        };
        let raw = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": null,
            "revision": null, "inference_mode": true, "r": r, "target_modules": targets,
            "exclude_modules": null, "lora_alpha": lora_alpha, "lora_dropout": 0.0,
            "fan_in_fan_out": false, "bias": "none", "use_rslora": false, "modules_to_save": null,
            "init_lora_weights": true, "layers_to_transform": null, "layers_pattern": null,
            "rank_pattern": {}, "alpha_pattern": {}, "use_dora": false, "lora_bias": false,
        });
        let Value::Object(raw) = raw else {
            unreachable!("a json object literal")
        };
        Self {
            r,
            lora_alpha,
            use_rslora: false,
            target_modules,
            exclude_modules: Excludes::None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            layers_to_transform: None,
            layers_pattern: vec![],
            base_model_name_or_path: None,
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            rank_re: vec![],
            alpha_re: vec![],
            raw,
        }
    }

    /// Reads `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TernError::io(path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(path, &format!("not valid JSON: {e}")))?;
        Self::from_json(v, path)
    }

    /// Parses the JSON of an `adapter_config.json`; `path` is only used in errors.
    pub fn from_json(v: Value, path: &Path) -> Result<Self> {
        let Value::Object(raw) = v else {
            return Err(bad(path, "adapter_config.json must be a JSON object"));
        };
        let get = |k: &str| raw.get(k).unwrap_or(&Value::Null);
        if let Some(t) = raw.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(bad(
                    path,
                    &format!(
                        "this is a `{t}` adapter; tern reads LoRA adapters (peft_type LORA) only"
                    ),
                ));
            }
        }
        let unsupported = |k: &str, what: &str| -> Result<()> {
            match raw.get(k) {
                Some(v) if !is_unset(v) => {
                    Err(bad(path, &format!("`{k}: {v}` is not supported: {what}")))
                }
                _ => Ok(()),
            }
        };
        unsupported("use_dora", "DoRA adds a magnitude vector tern does not implement; merge the adapter in PEFT (merge_and_unload) and load the merged model")?;
        unsupported("modules_to_save", "the adapter replaces whole modules (e.g. an embedding or head) besides its LoRA weights; merge it in PEFT and load the merged model")?;
        unsupported("lora_bias", "a bias on lora_B is not implemented")?;
        match get("bias") {
            Value::Null => {}
            Value::String(s) if s == "none" => {}
            other => unsupported_value(
                path,
                "bias",
                other,
                "only `none` is supported (the adapter also trains base biases)",
            )?,
        }
        match get("init_lora_weights") {
            Value::Null | Value::Bool(_) => {}
            Value::String(s) if s == "gaussian" || s == "orthogonal" => {}
            other => unsupported_value(path, "init_lora_weights", other, "this initialisation rewrites the base weights; re-save the adapter in PEFT with `path_initial_model_for_weight_conversion` to get a plain LoRA")?,
        }
        for (k, v) in &raw {
            if !IGNORED.contains(&k.as_str()) && !READ.contains(&k.as_str()) && !is_unset(v) {
                return Err(bad(path, &format!("field `{k}: {v}` selects a PEFT feature tern does not implement (supported: plain LoRA and rsLoRA with target/exclude modules and rank/alpha patterns)")));
            }
        }
        let r = match get("r").as_u64() {
            Some(r) if r > 0 => r as usize,
            _ => {
                return Err(bad(
                    path,
                    &format!("`r` must be a positive integer, got {}", get("r")),
                ))
            }
        };
        let lora_alpha = match get("lora_alpha") {
            Value::Null => 8.0,
            v => v
                .as_f64()
                .ok_or_else(|| bad(path, &format!("`lora_alpha` must be a number, got {v}")))?,
        };
        let use_rslora = get("use_rslora").as_bool().unwrap_or(false);
        let target_modules = match get("target_modules") {
            Value::String(s) if s == "all-linear" => Targets::AllLinear,
            Value::String(s) => Targets::Regex(full_regex(path, "target_modules", s)?),
            Value::Null => {
                return Err(bad(
                    path,
                    "`target_modules` is missing; it names the modules the adapter applies to",
                ))
            }
            v => Targets::List(strings(path, "target_modules", v)?),
        };
        let exclude_modules = match get("exclude_modules") {
            Value::Null => Excludes::None,
            Value::String(s) => Excludes::Regex(full_regex(path, "exclude_modules", s)?),
            v => Excludes::List(strings(path, "exclude_modules", v)?),
        };
        let pattern = |key: &str| -> Result<Vec<(String, f64, Regex)>> {
            match get(key) {
                Value::Null => Ok(vec![]),
                Value::Object(m) => m
                    .iter()
                    .map(|(k, v)| {
                        let x = v.as_f64().ok_or_else(|| {
                            bad(
                                path,
                                &format!("`{key}`: value for `{k}` must be a number, got {v}"),
                            )
                        })?;
                        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
                            .map_err(|e| bad(path, &format!("`{key}`: bad pattern `{k}`: {e}")))?;
                        Ok((k.clone(), x, re))
                    })
                    .collect(),
                v => Err(bad(
                    path,
                    &format!("`{key}` must be an object of pattern -> number, got {v}"),
                )),
            }
        };
        let ranks = pattern("rank_pattern")?;
        for (k, x, _) in &ranks {
            if *x < 1.0 || x.fract() != 0.0 {
                return Err(bad(
                    path,
                    &format!("`rank_pattern`: rank for `{k}` must be a positive integer, got {x}"),
                ));
            }
        }
        let alphas = pattern("alpha_pattern")?;
        let layers_to_transform = match get("layers_to_transform") {
            Value::Null => None,
            Value::Number(n) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
            v => Some(
                v.as_array()
                    .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(path, &format!("`layers_to_transform` must be an integer or a list of integers, got {v}")))?,
            ),
        };
        let layers_pattern = match get("layers_pattern") {
            Value::Null => vec![],
            Value::String(s) => vec![s.clone()],
            v => strings(path, "layers_pattern", v)?,
        };
        Ok(Self {
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            exclude_modules,
            rank_pattern: ranks
                .iter()
                .map(|(k, x, _)| (k.clone(), *x as usize))
                .collect(),
            alpha_pattern: alphas.iter().map(|(k, x, _)| (k.clone(), *x)).collect(),
            rank_re: ranks.into_iter().map(|(_, _, re)| re).collect(),
            alpha_re: alphas.into_iter().map(|(_, _, re)| re).collect(),
            layers_to_transform,
            layers_pattern,
            base_model_name_or_path: get("base_model_name_or_path").as_str().map(str::to_string),
            lora_dropout: get("lora_dropout").as_f64().unwrap_or(0.0),
            fan_in_fan_out: get("fan_in_fan_out").as_bool().unwrap_or(false),
            raw,
        })
    }

    /// Whether PEFT would put a LoRA layer on `module` (a full name such as
    /// `model.layers.0.self_attn.q_proj`); `is_head` marks the output head, which
    /// `all-linear` leaves out.
    pub fn targets(&self, module: &str, is_head: bool) -> bool {
        let excluded = match &self.exclude_modules {
            Excludes::None => false,
            Excludes::List(l) => suffix_match(l, module),
            Excludes::Regex(re) => re.is_match(module),
        };
        if excluded {
            return false;
        }
        match &self.target_modules {
            Targets::AllLinear => !is_head,
            Targets::Regex(re) => re.is_match(module),
            Targets::List(l) if l.iter().any(|t| t == module) => true,
            Targets::List(l) => suffix_match(l, module) && self.layer_selected(module),
        }
    }

    fn layer_selected(&self, module: &str) -> bool {
        let Some(layers) = &self.layers_to_transform else {
            return true;
        };
        let idx = if self.layers_pattern.is_empty() {
            Regex::new(r"^.*?\.[^.]*\.(\d+)\.")
                .ok()
                .and_then(|re| re.captures(module).map(|c| c[1].to_string()))
        } else {
            self.layers_pattern.iter().find_map(|p| {
                Regex::new(&format!(r"^(?:|.*?\.)(?:{p})\.(\d+)\."))
                    .ok()
                    .and_then(|re| re.captures(module).map(|c| c[1].to_string()))
            })
        };
        idx.and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| layers.contains(&i))
    }

    /// The rank PEFT gives `module`.
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_re
            .iter()
            .position(|re| re.is_match(module))
            .map_or(self.r, |i| self.rank_pattern[i].1)
    }

    /// The alpha PEFT gives `module`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_re
            .iter()
            .position(|re| re.is_match(module))
            .map_or(self.lora_alpha, |i| self.alpha_pattern[i].1)
    }

    /// The factor on `B A x` for `module`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f64 {
        let (r, a) = (self.rank_for(module) as f64, self.alpha_for(module));
        if self.use_rslora {
            a / r.sqrt()
        } else {
            a / r
        }
    }

    /// Sets rsLoRA scaling (for configs built in code).
    pub fn with_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self.raw.insert("use_rslora".into(), json!(on));
        self
    }

    /// Sets the training dropout (written to `lora_dropout`).
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self.raw.insert("lora_dropout".into(), json!(p));
        self
    }

    /// Records the base model (written to `base_model_name_or_path`).
    pub fn with_base_model(mut self, base: &str) -> Self {
        self.base_model_name_or_path = Some(base.to_string());
        self.raw
            .insert("base_model_name_or_path".into(), json!(base));
        self
    }

    /// The JSON to write as `adapter_config.json` (the file as read, or PEFT's defaults).
    pub fn to_json(&self) -> Value {
        Value::Object(self.raw.clone())
    }
}

fn unsupported_value(path: &Path, key: &str, v: &Value, what: &str) -> Result<()> {
    Err(bad(path, &format!("`{key}: {v}` is not supported: {what}")))
}

/// The directory an adapter path names: the directory itself, or the parent of a file in it.
pub fn adapter_dir(path: &Path) -> PathBuf {
    if path.is_file() {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> Result<AdapterConfig> {
        AdapterConfig::from_json(v, Path::new("adapter_config.json"))
    }

    #[test]
    fn targets_follow_peft_matching() {
        let c = cfg(
            json!({"r": 4, "target_modules": ["q_proj", "model.layers.1.mlp.up_proj"],
                           "exclude_modules": ["layers.0.self_attn.q_proj"]}),
        )
        .unwrap();
        assert!(c.targets("model.layers.1.self_attn.q_proj", false));
        assert!(!c.targets("model.layers.0.self_attn.q_proj", false));
        assert!(c.targets("model.layers.1.mlp.up_proj", false));
        assert!(!c.targets("model.layers.0.mlp.up_proj", false));
        assert!(!c.targets("model.layers.1.self_attn.xq_proj", false));
        let c = cfg(json!({"r": 4, "target_modules": r".*\.(q|v)_proj"})).unwrap();
        assert!(c.targets("model.layers.3.self_attn.v_proj", false));
        assert!(!c.targets("model.layers.3.self_attn.k_proj", false));
        let c = cfg(json!({"r": 4, "target_modules": "all-linear"})).unwrap();
        assert!(c.targets("model.layers.3.mlp.down_proj", false));
        assert!(!c.targets("lm_head", true));
        let c =
            cfg(json!({"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [1]})).unwrap();
        assert!(c.targets("model.layers.1.self_attn.q_proj", false));
        assert!(!c.targets("model.layers.0.self_attn.q_proj", false));
    }

    #[test]
    fn rank_alpha_patterns_and_scales() {
        let c = cfg(
            json!({"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                           "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
                           "alpha_pattern": {"o_proj": 3}}),
        )
        .unwrap();
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 2);
        assert_eq!(c.rank_for("model.layers.1.mlp.down_proj"), 6);
        assert_eq!(c.rank_for("model.layers.0.mlp.down_proj"), 4);
        // `q_proj` must match a whole name segment, not any name ending in those letters.
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj"), 4);
        assert_eq!(c.scale_for("model.layers.0.self_attn.o_proj"), 3.0 / 4.0);
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 8.0 / 2.0);
        let c = cfg(
            json!({"r": 16, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"]}),
        )
        .unwrap();
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let err = |v: Value| cfg(v).unwrap_err().to_string();
        let base = |k: &str, v: Value| {
            let mut m = json!({"r": 4, "target_modules": ["q_proj"]});
            m[k] = v;
            m
        };
        assert!(err(base("use_dora", json!(true))).contains("DoRA"));
        assert!(err(base("modules_to_save", json!(["lm_head"]))).contains("modules_to_save"));
        assert!(err(base("bias", json!("all"))).contains("`bias: \"all\"`"));
        assert!(err(base("peft_type", json!("IA3"))).contains("IA3"));
        assert!(err(base("init_lora_weights", json!("pissa"))).contains("pissa"));
        assert!(err(base("layer_replication", json!([[0, 2]]))).contains("layer_replication"));
        assert!(err(base("r", json!(0))).contains("`r`"));
        assert!(err(json!({"r": 4})).contains("target_modules"));
        // Fields that are off, or that do not change the math, are accepted.
        cfg(base("layer_replication", Value::Null)).unwrap();
        cfg(base("use_dora", json!(false))).unwrap();
        cfg(base("future_flag", json!(false))).unwrap();
        cfg(base("lora_dropout", json!(0.1))).unwrap();
    }

    #[test]
    fn new_config_round_trips() {
        let c = AdapterConfig::new(
            8,
            16.0,
            Targets::Regex(Regex::new(r"^(?:.*\.q_proj)$").unwrap()),
        )
        .with_rslora(true);
        let back = cfg(c.to_json()).unwrap();
        assert!(back.use_rslora);
        assert_eq!(back.r, 8);
        assert_eq!(c.to_json()["target_modules"], json!(r".*\.q_proj"));
        assert!(back.targets("model.layers.0.self_attn.q_proj", false));
    }
}
