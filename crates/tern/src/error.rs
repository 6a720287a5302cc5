//! The library's one error type: every variant names the file, tensor or field at fault and,
//! where there is one, the fix.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T> = std::result::Result<T, TernError>;

/// Everything that can go wrong in tern, typed so callers can react and users get one clear line.
#[derive(Debug, thiserror::Error)]
pub enum TernError {
    /// Reading or writing a file failed at the OS level.
    #[error("{path}: {err}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error (shown in the message, so not also a `source()`: a printed error
        /// chain would repeat it).
        err: std::io::Error,
    },
    /// A file the checkpoint needs is not there.
    #[error("{path}: file not found ({hint})")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file is for and how to supply it.
        hint: String,
    },
    /// The checkpoint has no tensor of this name.
    #[error("{file}: tensor `{tensor}` is missing (the checkpoint does not fit this architecture or is incomplete)")]
    MissingTensor {
        /// File (or index) searched.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
    },
    /// A tensor's shape does not match what the config implies.
    #[error(
        "{file}: tensor `{tensor}` has shape {actual:?}, expected {expected:?} from config.json"
    )]
    WrongShape {
        /// File holding the tensor.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Shape implied by the model config.
        expected: Vec<usize>,
        /// Shape stored in the file.
        actual: Vec<usize>,
    },
    /// A tensor is stored in a dtype tern cannot read.
    #[error("{file}: tensor `{tensor}` has unsupported dtype `{dtype}` (supported: F32, F16, BF16, F64)")]
    UnknownDtype {
        /// File holding the tensor.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// The file ends before the data it declares.
    #[error("{file}: truncated file: {detail} (re-download or re-save it)")]
    Truncated {
        /// The file.
        file: PathBuf,
        /// What was expected where.
        detail: String,
    },
    /// A safetensors header length that runs past the end of the file.
    #[error("{file}: header length {header_len} runs past the end of the {file_len}-byte file (not a safetensors file, or truncated)")]
    HeaderPastEnd {
        /// The file.
        file: PathBuf,
        /// Declared header length.
        header_len: u64,
        /// Actual file length.
        file_len: u64,
    },
    /// The safetensors header is not valid JSON of the expected form.
    #[error("{file}: header is not valid safetensors JSON: {detail}")]
    HeaderNotJson {
        /// The file.
        file: PathBuf,
        /// The parser's complaint.
        detail: String,
    },
    /// A tensor's data offsets are outside the data section or inconsistent with its shape.
    #[error("{file}: tensor `{tensor}` has bad data offsets: {detail}")]
    BadOffsets {
        /// The file.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// Two tensors claim the same bytes.
    #[error("{file}: tensors `{first}` and `{second}` overlap in the data section (corrupt file)")]
    OverlappingTensors {
        /// The file.
        file: PathBuf,
        /// One tensor.
        first: String,
        /// The tensor overlapping it.
        second: String,
    },
    /// The checkpoint's architecture is not one tern implements.
    #[error("{file}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        /// config.json or the GGUF file.
        file: PathBuf,
        /// The architecture found.
        arch: String,
        /// Comma-separated list of what is supported.
        supported: String,
    },
    /// A config field is missing or has a bad value.
    #[error("{file}: field `{key}`: {detail}")]
    Config {
        /// The config file (config.json, generation_config.json, a GGUF file...).
        file: PathBuf,
        /// The key at fault.
        key: String,
        /// What is wrong and what is expected.
        detail: String,
    },
    /// A malformed GGUF file.
    #[error("{file}: bad GGUF file: {detail}")]
    Gguf {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A Hugging Face Hub id could not be resolved.
    #[error("{id}: {detail}")]
    Hub {
        /// `ORG/NAME@revision`.
        id: String,
        /// What was looked for and how to fix it.
        detail: String,
    },
    /// A legacy PyTorch pickle that is malformed or asks for code to be run.
    #[error("{file}: {detail}")]
    Pickle {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A LoRA adapter's files are malformed, use a PEFT feature tern does not support, or do
    /// not fit the base model.
    #[error("{path}: {detail}")]
    Adapter {
        /// The adapter directory or file at fault.
        path: PathBuf,
        /// What is wrong and what to do about it.
        detail: String,
    },
    /// No adapter of this name is registered.
    #[error("unknown adapter `{name}` (loaded: {known}); load it first")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// Comma-separated names that are registered, or `none`.
        known: String,
    },
    /// The engine's queue is full; the caller should retry later.
    #[error(
        "the server is busy: {queued} requests are already waiting (limit {limit}); retry later"
    )]
    Busy {
        /// Requests waiting when this one arrived.
        queued: usize,
        /// The queue bound.
        limit: usize,
    },
    /// The engine is shutting down and takes no new requests.
    #[error("shutting down: no new requests are taken")]
    ShuttingDown,
    /// A request was stopped before it finished.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A caller passed a bad argument (e.g. a sampling parameter out of range).
    #[error("{0}")]
    InvalidArgument(String),
    /// A tensor operation failed (shown in the message, not also a `source()`).
    #[error("tensor op: {0}")]
    Candle(candle_core::Error),
}

impl TernError {
    /// The error as candle's, for code that runs inside candle (a custom op's forward or
    /// backward) and calls into tern.
    pub(crate) fn into_candle(self) -> candle_core::Error {
        candle_core::Error::Msg(self.to_string())
    }
}

impl From<candle_core::Error> for TernError {
    fn from(e: candle_core::Error) -> Self {
        TernError::Candle(without_backtrace(e))
    }
}

/// The message of a candle error, without its backtrace (for errors that carry it as text).
pub(crate) fn candle_message(e: candle_core::Error) -> String {
    without_backtrace(e).to_string()
}

/// `e` without the backtrace candle attaches when `RUST_BACKTRACE` is set: it printed as dozens
/// of lines inside what should be a one-line message.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => without_backtrace(*inner),
        E::WithPath { inner, path } => E::WithPath {
            inner: Box::new(without_backtrace(*inner)),
            path,
        },
        E::Context { inner, context } => E::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        e => e,
    }
}

impl TernError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TernError::Io {
            path: path.into(),
            err: source,
        }
    }
}
