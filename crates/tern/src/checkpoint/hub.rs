//! Hugging Face Hub ids (`ORG/NAME[@revision]`) resolved to local directories: first from the
//! local Hugging Face cache (the `models--ORG--NAME/{refs,snapshots}` layout `huggingface_hub`
//! writes), then, unless offline, downloaded into that same cache with the `hf-hub` crate.

use crate::error::{Result, TernError};
use std::path::{Path, PathBuf};

/// Where and how ids are resolved.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Access token (`HF_TOKEN`, else the token file `huggingface-cli login` writes).
    pub token: Option<String>,
    /// Hub URL (`HF_ENDPOINT`, else `https://huggingface.co`).
    pub endpoint: String,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

impl HubOptions {
    /// The settings `huggingface_hub` would use, from the environment.
    pub fn from_env() -> Self {
        let home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = env("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        let token = env("HF_TOKEN").or_else(|| {
            let p = env("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("token"));
            std::fs::read_to_string(p)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        Self {
            cache_dir,
            offline,
            token,
            endpoint: env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
        }
    }
}

/// A parsed `ORG/NAME[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit (default `main`).
    pub revision: String,
}

impl HubId {
    /// Parses an id; `None` when `s` does not look like one.
    pub fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let mut parts = repo.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(org), Some(name), None) if ok(org) && ok(name) => Some(Self {
                repo: repo.to_string(),
                revision: revision.to_string(),
            }),
            _ => None,
        }
    }

    fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// What a resolved directory must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// A model checkpoint.
    Model,
    /// A PEFT adapter.
    Adapter,
}

impl RepoKind {
    /// Whether `dir` has the files this kind needs (shards are checked when opened).
    fn complete(self, dir: &Path) -> bool {
        let has = |n: &str| dir.join(n).is_file();
        match self {
            RepoKind::Model => {
                has("config.json")
                    && (has("model.safetensors")
                        || has("model.safetensors.index.json")
                        || has("pytorch_model.bin")
                        || has("pytorch_model.bin.index.json"))
            }
            RepoKind::Adapter => {
                has("adapter_config.json")
                    && (has("adapter_model.safetensors") || has("adapter_model.bin"))
            }
        }
    }
}

fn hub_err(id: &HubId, detail: String) -> TernError {
    TernError::Hub {
        id: id.to_string(),
        detail,
    }
}

/// The cached snapshot directory of `id`, if the cache has one.
pub fn cached(id: &HubId, cache_dir: &Path) -> Option<PathBuf> {
    let repo = cache_dir.join(id.folder());
    let commit = match std::fs::read_to_string(repo.join("refs").join(&id.revision)) {
        Ok(c) => c.trim().to_string(),
        // A commit hash names its snapshot directly.
        Err(_) if id.revision.len() >= 7 && id.revision.chars().all(|c| c.is_ascii_hexdigit()) => {
            id.revision.clone()
        }
        Err(_) => return None,
    };
    let dir = repo.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// A local path as given, or a Hub id resolved to its directory in the cache (downloaded
/// first unless offline).
pub fn resolve(spec: &str, kind: RepoKind, opts: &HubOptions) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.exists() {
        return Ok(local.to_path_buf());
    }
    let Some(id) = HubId::parse(spec) else {
        return Err(TernError::MissingFile {
            path: local.to_path_buf(),
            hint: "not a file or directory here, and not a Hub id of the form ORG/NAME[@revision]"
                .into(),
        });
    };
    let snapshot = cached(&id, &opts.cache_dir);
    if let Some(dir) = &snapshot {
        if kind.complete(dir) {
            return Ok(dir.clone());
        }
    }
    // A mistyped local path reads like a Hub id too: say first that nothing is here.
    let here = |e: TernError| match e {
        TernError::Hub { id, detail } => TernError::Hub {
            id,
            detail: format!(
                "no file or directory `{spec}` here, so it was taken as a Hub id: {detail}"
            ),
        },
        e => e,
    };
    let looked = opts.cache_dir.join(id.folder());
    if opts.offline {
        let what = match snapshot {
            Some(d) => format!("{} lacks the {kind:?} files", d.display()),
            None => format!("{} has no snapshot for `{}`", looked.display(), id.revision),
        };
        return Err(here(hub_err(&id, format!("not in the Hugging Face cache ({what}) and HF_HUB_OFFLINE is set; unset it to download, or pass a local path"))));
    }
    download(&id, kind, opts).map_err(here)
}

#[cfg(feature = "hub")]
fn download(id: &HubId, kind: RepoKind, opts: &HubOptions) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};
    let e = |what: &str, err: hf_hub::api::sync::ApiError| {
        hub_err(id, format!("{what}: {err} (looked in {} first; set HF_TOKEN for gated or private repos, HF_HUB_OFFLINE=1 to stay offline)", opts.cache_dir.join(id.folder()).display()))
    };
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_token(opts.token.clone())
        .with_endpoint(opts.endpoint.clone())
        .with_progress(true)
        .build()
        .map_err(|err| e("starting the download client", err))?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let info = repo
        .info()
        .map_err(|err| e("asking the Hub for the file list", err))?;
    let have: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let mut want: Vec<String> = Vec::new();
    let mut take = |n: &str| {
        if have.contains(&n) {
            want.push(n.to_string());
            true
        } else {
            false
        }
    };
    let mut index = None;
    match kind {
        RepoKind::Model => {
            for n in [
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "chat_template.jinja",
            ] {
                take(n);
            }
            // Safetensors first, always; pickles only when there are none.
            if take("model.safetensors.index.json") {
                index = Some("model.safetensors.index.json");
            } else if !take("model.safetensors") {
                if take("pytorch_model.bin.index.json") {
                    index = Some("pytorch_model.bin.index.json");
                } else {
                    take("pytorch_model.bin");
                }
            }
        }
        RepoKind::Adapter => {
            take("adapter_config.json");
            if !take("adapter_model.safetensors") {
                take("adapter_model.bin");
            }
        }
    }
    let mut dir = None;
    for f in &want {
        let p = repo
            .get(f)
            .map_err(|err| e(&format!("downloading {f}"), err))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    let dir = dir.ok_or_else(|| {
        hub_err(
            id,
            format!(
                "the repo has none of the files a {kind:?} needs (found: {})",
                have.join(", ")
            ),
        )
    })?;
    if let Some(ix) = index {
        let text = std::fs::read_to_string(dir.join(ix))
            .map_err(|err| TernError::io(dir.join(ix), err))?;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let mut shards: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            repo.get(&s)
                .map_err(|err| e(&format!("downloading {s}"), err))?;
        }
    }
    if !kind.complete(&dir) {
        return Err(hub_err(
            id,
            format!(
                "downloaded, but the repo lacks the files a {kind:?} needs (found: {})",
                have.join(", ")
            ),
        ));
    }
    Ok(dir)
}

#[cfg(not(feature = "hub"))]
fn download(id: &HubId, _: RepoKind, opts: &HubOptions) -> Result<PathBuf> {
    Err(hub_err(id, format!("not in the Hugging Face cache ({}), and this build has no `hub` feature to download it", opts.cache_dir.join(id.folder()).display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse() {
        assert_eq!(
            HubId::parse("HuggingFaceTB/SmolLM2-135M@v1.0"),
            Some(HubId {
                repo: "HuggingFaceTB/SmolLM2-135M".into(),
                revision: "v1.0".into()
            })
        );
        assert_eq!(HubId::parse("org/name").unwrap().revision, "main");
        for bad in [
            "name",
            "a/b/c",
            "./x/y",
            "org/",
            "org/name@",
            "/abs/path",
            "a b/c",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }
}
