//! The loss curve as a PNG: training loss per step (blue) and eval loss (red dots) over a
//! light grid, with the y range and the step count written in a tiny built-in digit font.
//! A plotting library would bring fonts and an image stack for one chart.

use crate::error::{Result, TernError};
use std::path::Path;

const W: usize = 800;
const H: usize = 480;
// Margins: left, right, top, bottom.
const L: usize = 70;
const R: usize = 20;
const T: usize = 20;
const B: usize = 40;

/// 3x5 glyphs for the characters the labels use.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

struct Canvas(Vec<u8>);

impl Canvas {
    fn px(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.0[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = ((x0 + (x1 - x0) * t) as i64, (y0 + (y1 - y0) * t) as i64);
            for d in 0..thick {
                self.px(x, y + d, c);
            }
        }
    }

    fn text(&mut self, s: &str, x: usize, y: usize) {
        for (k, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.px(
                                (x + k * 8 + col * 2 + dx) as i64,
                                (y + row * 2 + dy) as i64,
                                [40, 40, 40],
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Draws `loss[i]` at step `i + 1` and `eval` as `(step, loss)` points into `path`.
pub fn loss_png(path: &Path, loss: &[f64], eval: &[(usize, f64)]) -> Result<()> {
    let finite = loss
        .iter()
        .chain(eval.iter().map(|e| &e.1))
        .copied()
        .filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo <= hi {
        (lo.min(0.0), hi.max(lo + 1e-9))
    } else {
        (0.0, 1.0)
    };
    let steps = loss.len().max(1);
    let (pw, ph) = ((W - L - R) as f64, (H - T - B) as f64);
    let at = |step: f64, v: f64| {
        (
            L as f64 + pw * (step - 1.0) / (steps.max(2) - 1) as f64,
            T as f64 + ph * (1.0 - (v - lo) / (hi - lo)),
        )
    };
    let mut c = Canvas(vec![255; W * H * 3]);
    for k in 0..=4 {
        let y = T as f64 + ph * k as f64 / 4.0;
        c.line((L as f64, y), ((W - R) as f64, y), [225, 225, 225], 1);
        c.text(
            &format!("{:.3}", hi - (hi - lo) * k as f64 / 4.0),
            4,
            y as usize - 4,
        );
    }
    c.line(
        (L as f64, T as f64),
        (L as f64, (H - B) as f64),
        [0, 0, 0],
        1,
    );
    c.line(
        (L as f64, (H - B) as f64),
        ((W - R) as f64, (H - B) as f64),
        [0, 0, 0],
        1,
    );
    c.text("1", L, H - B + 8);
    c.text(
        &steps.to_string(),
        W - R - 8 * steps.to_string().len(),
        H - B + 8,
    );
    for (i, w) in loss.windows(2).enumerate() {
        if w[0].is_finite() && w[1].is_finite() {
            c.line(
                at(i as f64 + 1.0, w[0]),
                at(i as f64 + 2.0, w[1]),
                [31, 119, 180],
                2,
            );
        }
    }
    for &(s, v) in eval {
        let (x, y) = at(s as f64, v);
        for dx in -3..=3 {
            for dy in -3..=3 {
                c.px(x as i64 + dx, y as i64 + dy, [214, 39, 40]);
            }
        }
    }
    let png_err = |e: png::EncodingError| TernError::io(path, std::io::Error::other(e));
    crate::checkpoint::writer::write_file_atomic(path, |f| {
        let mut enc = png::Encoder::new(f, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(png_err)?;
        w.write_image_data(&c.0).map_err(png_err)?;
        w.finish().map_err(png_err)
    })
}
