//! The GPU paths against their CPU twins and the transformers/PEFT references, built only with
//! `--features cuda` (scripts/cuda/build.sh) and run on a GPU machine (scripts/cuda/run_gpu.sh).
//! Tolerances: f32 within 1e-4 of the references and of the CPU (as the CPU tests ask), bf16
//! a mean log-prob difference under 0.05 with clear winners unchanged.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use std::path::PathBuf;
use tern::device::DeviceKind;
use tern::lora::BatchAdapters;
use tern::{LoadOptions, LoadedModel};

fn on(device: DeviceKind, dtype: DType, name: &str) -> LoadedModel {
    LoadedModel::load(
        &fixture(name),
        &LoadOptions {
            device,
            dtype: Some(dtype),
            ..Default::default()
        },
    )
    .unwrap()
}

fn gpu(name: &str) -> LoadedModel {
    on(DeviceKind::Cuda(0), DType::F32, name)
}

fn cpu(name: &str) -> LoadedModel {
    on(DeviceKind::Cpu, DType::F32, name)
}

#[test]
fn every_architecture_matches_transformers_on_the_gpu() {
    for arch in ARCHS {
        let r = reference(arch);
        let lm = gpu(arch);
        assert!(lm.model.device().is_cuda(), "{arch}: not on the GPU");
        let lp = logprobs(&lm, &r.input_ids, &mut lm.model.new_cache());
        let d = worst_row_diff(&lp, &r.prompt_logprobs);
        assert!(d < 1e-4, "{arch} f32 on GPU vs transformers: {d}");
        let mut req = tern::GenerateRequest::new(r.input_ids.clone(), r.greedy_ids.len());
        req.stop_at_eos = false;
        assert_eq!(
            lm.generate_collect(req).unwrap().ids(),
            r.greedy_ids,
            "{arch}"
        );
        let bf = on(DeviceKind::Cuda(0), DType::BF16, arch);
        let lp = logprobs(&bf, &r.input_ids, &mut bf.model.new_cache());
        bf16_close(arch, &lp, &r.prompt_logprobs);
    }
}

/// bf16 keeps 8 bits of mantissa: a few hundredths of a nat on average, and no clear winner
/// (a margin over 0.5) may change (the CPU's bf16 test, reference_parity.rs, asks the same).
fn bf16_close(arch: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    let (mut sum, mut n) = (0f32, 0usize);
    for (a, b) in got.iter().zip(want) {
        sum += a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>();
        n += a.len();
        let mut sorted = b.clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        if sorted[0] - sorted[1] > 0.5 {
            let am = tern::generate::sampler::argmax;
            assert_eq!(am(a), am(b), "{arch}: a clear winner changed under bf16");
        }
    }
    assert!(
        sum / (n as f32) < 0.05,
        "{arch}: bf16 mean diff {}",
        sum / n as f32
    );
}

#[test]
fn adapters_and_mixed_batches_equal_the_cpu() {
    let r = reference("llama");
    let dir = adapter_dir("llama_rslora_all");
    let (g, c) = (gpu("llama"), cpu("llama"));
    let (ga, ca) = (
        g.load_adapter(&dir, "a").unwrap(),
        c.load_adapter(&dir, "a").unwrap(),
    );
    let (gb, cb) = (variant(&g, &ga), variant(&c, &ca));
    let run = |lm: &LoadedModel, rows: Vec<Option<std::sync::Arc<tern::lora::LoraAdapter>>>| {
        let dev = lm.model.device();
        let n = rows.len();
        let batch = batch_of(&r.input_ids, n, dev);
        let ad = BatchAdapters::per_row(&rows, dev).unwrap();
        let mut cache = lm.model.new_cache();
        let mut out = vec![lm.model.forward_last_with(&batch, &mut cache, &ad).unwrap()];
        for t in [5u32, 17] {
            let x = Tensor::new(vec![t; n], dev).unwrap().unsqueeze(1).unwrap();
            out.push(lm.model.forward_last_with(&x, &mut cache, &ad).unwrap());
        }
        out.into_iter()
            .map(|t| t.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap())
            .collect::<Vec<_>>()
    };
    let got = run(&g, vec![Some(ga.clone()), None, Some(gb)]);
    let want = run(&c, vec![Some(ca.clone()), None, Some(cb)]);
    for (s, (x, y)) in got.iter().zip(&want).enumerate() {
        let d = worst_row_diff(x, y);
        assert!(d < 1e-4, "step {s}: mixed-adapter batch GPU vs CPU {d}");
    }
    // One adapter through the whole prompt: the PEFT reference's numbers.
    let ad = BatchAdapters::uniform(Some(ga));
    let lp = logprobs_with(&g, &r.input_ids, &mut g.model.new_cache(), &ad);
    let lc = logprobs_with(
        &c,
        &r.input_ids,
        &mut c.model.new_cache(),
        &BatchAdapters::uniform(Some(ca)),
    );
    assert!(worst_row_diff(&lp, &lc) < 1e-4);
}

#[test]
fn a_training_step_gives_the_cpu_gradients() {
    let train = |lm: &LoadedModel| {
        let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train");
        let data =
            tern::train::data::load_jsonl(&fx.join("memorise.jsonl"), lm, 64, false).unwrap();
        let cfg = tern::train::TrainConfig::load(None, serde_json::json!({"seed": 3})).unwrap();
        let t = tern::train::Trainer::from_adapter(lm, cfg, &fx.join("adapter_init")).unwrap();
        let first: Vec<&tern::train::data::Example> = data.iter().take(4).collect();
        let batch = tern::train::data::pad(&first, 0);
        let (loss, grads) = t.loss_and_grads(std::slice::from_ref(&batch)).unwrap();
        let grads: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_device(&Device::Cpu).unwrap())
            .collect();
        (loss, grads)
    };
    let (gl, gg) = train(&gpu("llama"));
    let (cl, cg) = train(&cpu("llama"));
    assert!(((gl - cl) / cl).abs() < 1e-4, "loss GPU {gl} vs CPU {cl}");
    for (i, (a, b)) in gg.iter().zip(&cg).enumerate() {
        let d = rel(a, b);
        assert!(d < 1e-4, "gradient {i}: relative difference {d}");
    }
}
