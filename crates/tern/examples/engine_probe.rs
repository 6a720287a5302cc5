use std::sync::Arc;
use std::time::Instant;
use tern::generate::{Engine, EngineConfig, EngineEvent};
use tern::{GenerateRequest, LoadOptions, LoadedModel};

fn main() {
    let path = std::env::args().nth(1).unwrap();
    tern::device::pin_cpu_threads();
    let lm = Arc::new(LoadedModel::load(path.as_ref(), &LoadOptions::default()).unwrap());
    for &n in &[1usize, 2, 4, 8, 16] {
        let engine = Engine::start(
            lm.clone(),
            EngineConfig {
                max_batch: n,
                ..Default::default()
            },
        )
        .unwrap();
        let t = Instant::now();
        let rxs: Vec<_> = (0..n)
            .map(|i| {
                let mut r = GenerateRequest::new(vec![1, 2, 3, 4 + i as u32], 32);
                r.stop_at_eos = false;
                engine.submit_channel(r).unwrap()
            })
            .collect();
        let mut toks = 0;
        for rx in rxs {
            for ev in rx {
                if let EngineEvent::Token(_) = ev {
                    toks += 1
                }
            }
        }
        let s = engine.stats();
        println!(
            "batch {n}: {toks} tokens in {:.2}s = {:.1} tok/s, steps {}",
            t.elapsed().as_secs_f64(),
            toks as f64 / t.elapsed().as_secs_f64(),
            s.steps
        );
    }
}
