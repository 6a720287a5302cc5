//! Which GGML block type each weight gets when float weights are quantized (at load time with
//! `--quantize`, or into a GGUF file with `tern quantize`).
//!
//! Only the projection matrices are quantized: embeddings and norms stay float (they are small
//! or looked up a row at a time), as llama.cpp does. An untied output head is a linear layer
//! like the others, but errors there reach the logits undamped, so it gets Q8_0 whatever the
//! requested type (llama.cpp keeps it at Q6_K or better for the same reason). A matrix whose
//! width is not a multiple of the type's block falls back the way llama.cpp's quantizer does
//! (Q4_K -> Q5_0): SmolLM2's 576-wide layers cannot hold 256-element K-quant blocks.

use crate::error::{Result, TernError};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use std::fmt;
use std::str::FromStr;

/// A quantization type users can ask for, or a half-width float type (bf16, f16: projections
/// stored in it and multiplied with f32 activations, see [`crate::quant::half_float`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// 8-bit, 32-element blocks with one f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit k-quant, 256-element super-blocks (4.5 bits per weight).
    Q4K,
    /// 4-bit, 32-element blocks with one f16 scale (4.5 bits per weight).
    Q4_0,
    /// 4-bit, 32-element blocks with an f16 scale and minimum (5 bits per weight).
    Q4_1,
    /// 5-bit, 32-element blocks with one f16 scale (5.5 bits per weight).
    Q5_0,
    /// bfloat16 (16 bits per weight; f32's range, 8 significant bits).
    Bf16,
    /// IEEE half precision (16 bits per weight; 11 significant bits, magnitudes up to 65504).
    F16,
}

impl QuantType {
    /// Every type, in the order help texts list them.
    pub const ALL: [QuantType; 7] = [
        QuantType::Q8_0,
        QuantType::Q4K,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Bf16,
        QuantType::F16,
    ];

    /// Whether this is a half-width float type rather than GGML blocks.
    pub fn is_half_float(self) -> bool {
        matches!(self, QuantType::Bf16 | QuantType::F16)
    }

    /// The GGML block type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4K => GgmlDType::Q4K,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Bf16 => GgmlDType::BF16,
            QuantType::F16 => GgmlDType::F16,
        }
    }

    /// The lowercase name used on the command line and in GGUF file names.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4K => "q4_k",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q5_0 => "q5_0",
            QuantType::Bf16 => "bf16",
            QuantType::F16 => "f16",
        }
    }

    /// llama.cpp's `general.file_type` code for a file mostly of this type.
    pub fn gguf_file_type(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q8_0 => 7,
            QuantType::Q5_0 => 8,
            QuantType::Q4K => 15, // MOSTLY_Q4_K_M
            QuantType::F16 => 1,
            QuantType::Bf16 => 32,
        }
    }

    /// The block type a `[rows, cols]` matrix gets: this type when `cols` holds whole blocks,
    /// else llama.cpp's fallback; `None` when no 32-element type fits either (stay float).
    pub fn for_width(self, cols: usize) -> Option<GgmlDType> {
        let want = self.ggml();
        if cols.is_multiple_of(want.block_size()) {
            return Some(want);
        }
        let fallback = match self {
            QuantType::Q4K => GgmlDType::Q5_0,
            _ => return None,
        };
        cols.is_multiple_of(fallback.block_size())
            .then_some(fallback)
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantType {
    type Err = TernError;

    fn from_str(s: &str) -> Result<Self> {
        let key = s.to_ascii_lowercase().replace('-', "_");
        let key = match key.as_str() {
            "q4_k_m" | "q4k" => "q4_k",
            "q80" => "q8_0",
            k => k,
        }
        .to_string();
        QuantType::ALL
            .into_iter()
            .find(|t| t.name() == key)
            .ok_or_else(|| {
                TernError::InvalidArgument(format!(
                    "unknown quantization type `{s}`; choose one of {}",
                    QuantType::ALL.map(|t| t.name()).join(", ")
                ))
            })
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between get more bits in its `_M` mixes (those layers' errors cost the most).
fn more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    layer < eighth || layer >= 7 * layers / 8 || (layer - eighth) % 3 == 2
}

/// What a weight of this Hugging Face name and shape becomes under `q` in a model of `layers`
/// decoder layers: `None` keeps it float. The half-width types also take the embedding table.
///
/// Q4_K is llama.cpp's Q4_K_M mix: `v_proj` and `down_proj` of the [`more_bits`] layers get
/// Q6_K (Q8_0 where 256-element blocks do not fit, as llama.cpp falls back).
pub fn plan(q: QuantType, name: &str, dims: &[usize], layers: usize) -> Option<GgmlDType> {
    let &[_, cols] = dims else { return None };
    if name == "lm_head.weight" {
        // A half-width type is already finer than Q8_0.
        let head = if q.is_half_float() {
            q
        } else {
            QuantType::Q8_0
        };
        return head.for_width(cols);
    }
    // A half-width table loses no more than the layers do, is read a row per token, and a
    // tied head multiplies by it in place: half the bytes, and no f32 copy beside the head's.
    if name == "model.embed_tokens.weight" && q.is_half_float() {
        return q.for_width(cols);
    }
    let rest = name.strip_prefix("model.layers.")?;
    let projection =
        name.ends_with("_proj.weight") && (name.contains(".self_attn.") || name.contains(".mlp."));
    if !projection {
        return None;
    }
    let layer: usize = rest.split('.').next()?.parse().ok()?;
    let sensitive = name.ends_with(".v_proj.weight") || name.ends_with(".down_proj.weight");
    if q == QuantType::Q4K && sensitive && more_bits(layer, layers) {
        return Some(if cols.is_multiple_of(GgmlDType::Q6K.block_size()) {
            GgmlDType::Q6K
        } else {
            GgmlDType::Q8_0
        });
    }
    q.for_width(cols)
}

/// Decoder layers in a model, from its weight names (`model.layers.N.` prefixes).
pub fn layer_count<'a>(names: impl IntoIterator<Item = &'a str>) -> usize {
    names
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// Quantizes `t` to `dtype`, naming the tensor if it cannot be.
///
/// Q6_K goes through tern's own scale search ([`crate::quant::q6_k`]); everything else
/// through candle's quantizers.
pub fn quantize_tensor(name: &str, t: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    let bad = |e: String| {
        TernError::InvalidArgument(format!("cannot quantize `{name}` to {dtype:?}: {e}"))
    };
    if dtype == GgmlDType::Q6K && t.device().is_cpu() {
        return crate::quant::q6_k::quantize(t).map_err(|e| bad(e.to_string()));
    }
    QTensor::quantize(t, dtype).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_refuses_unknown() {
        assert_eq!("Q4_K_M".parse::<QuantType>().unwrap(), QuantType::Q4K);
        assert_eq!("q8_0".parse::<QuantType>().unwrap(), QuantType::Q8_0);
        let e = "q3_k".parse::<QuantType>().unwrap_err().to_string();
        assert!(e.contains("q3_k") && e.contains("q8_0, q4_k"), "{e}");
    }

    #[test]
    fn only_projections_untied_head_and_half_width_tables_are_quantized() {
        let q = QuantType::Q4K;
        let p = "model.layers.3.self_attn.q_proj.weight";
        assert_eq!(plan(q, p, &[512, 512], 30), Some(GgmlDType::Q4K));
        // 576 is not a multiple of 256: llama.cpp's Q4_K fallback.
        assert_eq!(plan(q, p, &[576, 576], 30), Some(GgmlDType::Q5_0));
        assert_eq!(plan(q, p, &[8, 24], 30), None);
        let head = plan(q, "lm_head.weight", &[100, 576], 30);
        assert_eq!(head, Some(GgmlDType::Q8_0));
        assert_eq!(plan(q, "model.embed_tokens.weight", &[100, 576], 30), None);
        // Half width takes the table too (lookups widen rows; a tied head shares it).
        for h in [QuantType::Bf16, QuantType::F16] {
            let e = plan(h, "model.embed_tokens.weight", &[100, 576], 30);
            assert_eq!(e, Some(h.ggml()));
        }
        let norm = "model.layers.0.input_layernorm.weight";
        assert_eq!(plan(q, norm, &[576], 30), None);
        assert_eq!(
            plan(q, "model.layers.0.self_attn.q_proj.bias", &[576], 30),
            None
        );
        assert_eq!(
            plan(QuantType::Q8_0, p, &[64, 64], 30),
            Some(GgmlDType::Q8_0)
        );
    }

    #[test]
    fn q4_k_gives_sensitive_layers_more_bits_as_llama_cpp() {
        // SmolLM2 (30 layers): llama.cpp's Q4_K_M put 14 down_proj in Q6_K and 14 v_proj in
        // Q8_0 (576-wide, no room for Q6_K's 256 blocks).
        let at = |i: usize, m: &str, dims: &[usize]| {
            plan(
                QuantType::Q4K,
                &format!("model.layers.{i}.{m}.weight"),
                dims,
                30,
            )
        };
        let down = |i| at(i, "mlp.down_proj", &[576, 1536]);
        let v = |i| at(i, "self_attn.v_proj", &[192, 576]);
        let more: Vec<usize> = (0..30)
            .filter(|&i| down(i) == Some(GgmlDType::Q6K))
            .collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        assert_eq!(down(3), Some(GgmlDType::Q4K));
        assert_eq!(v(0), Some(GgmlDType::Q8_0));
        assert_eq!(v(3), Some(GgmlDType::Q5_0));
        let names = ["model.layers.0.a", "model.layers.11.b", "lm_head.weight"];
        assert_eq!(layer_count(names), 12);
    }
}
