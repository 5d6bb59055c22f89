//! Random networks for the compression tests: random depths, widths, kernels, batch-norm
//! and noise placement, residual adds, concats, flatten into linear, and random masks.
#![allow(dead_code)]

use std::path::PathBuf;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{BatchNormConfig, Conv2dConfig, VarBuilder, VarMap};
use candle_sbp::net::{Activation, NetBuilder, NodeId, NodeShape};
use candle_sbp::{LogNormalDropoutConfig, Net};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A generated network and what the generator knows about it.
pub struct Generated {
    pub net: Net,
    pub varmap: VarMap,
    /// `(layer, noise)` pairs where the noise layer reads the layer's output directly and
    /// is its only consumer, outside residual blocks: the layer keeps at most the units the
    /// noise layer keeps (and its own mask keeps).
    pub direct_pairs: Vec<(String, String)>,
}

struct Gen<'a> {
    rng: StdRng,
    b: NetBuilder<'a>,
    count: usize,
    direct_pairs: Vec<(String, String)>,
}

impl Gen<'_> {
    fn name(&mut self, kind: &str) -> String {
        self.count += 1;
        format!("{kind}{}", self.count)
    }

    fn activation(&mut self) -> Activation {
        match self.rng.random_range(0..6) {
            0 | 1 => Activation::Relu,
            2 => Activation::LeakyRelu { slope: 0.1 },
            3 => Activation::Tanh,
            4 => Activation::Sigmoid,
            _ => Activation::Gelu,
        }
    }

    fn noise(&mut self, x: NodeId) -> NodeId {
        let name = self.name("sbp");
        self.b
            .log_normal_dropout(&name, x, LogNormalDropoutConfig::default())
            .unwrap()
    }

    fn maybe_noise(&mut self, x: NodeId, p: f64) -> NodeId {
        if self.rng.random_bool(p) {
            self.noise(x)
        } else {
            x
        }
    }

    fn bn(&mut self, x: NodeId) -> NodeId {
        let name = self.name("bn");
        let config = BatchNormConfig {
            affine: self.rng.random_bool(0.7),
            ..BatchNormConfig::default()
        };
        self.b.batch_norm(&name, x, config).unwrap()
    }

    fn conv(&mut self, x: NodeId, out: usize, allow_stride: bool) -> NodeId {
        let NodeShape::Image { height, width, .. } = self.b.shape(x) else {
            unreachable!()
        };
        let size = height.min(width);
        let kernel = self.rng.random_range(1..=3usize.min(size));
        let padding = if kernel > 1 {
            self.rng.random_range(0..=1)
        } else {
            0
        };
        let stride = if allow_stride && size >= 6 && self.rng.random_bool(0.3) {
            2
        } else {
            1
        };
        let name = self.name("conv");
        let config = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let bias = self.rng.random_bool(0.7);
        self.b
            .conv2d_with_bias(&name, x, out, kernel, config, bias)
            .unwrap()
    }

    /// layer → [noise] / [bn] / act in a random order, noise anywhere.
    fn post(&mut self, layer: NodeId, layer_name: String, in_residual: bool) -> NodeId {
        let with_bn = self.rng.random_bool(0.6);
        let noise_at = self.rng.random_range(0..4); // 0: right after the layer, 1: after bn, 2: after act, 3: none
        let mut x = layer;
        if noise_at == 0 {
            x = self.noise(x);
            if !in_residual {
                let noise_name = self.b.spec().nodes[x.index()].name.clone();
                self.direct_pairs.push((layer_name, noise_name));
            }
        }
        if with_bn {
            x = self.bn(x);
        }
        if noise_at == 1 {
            x = self.noise(x);
        }
        let f = self.activation();
        x = self.b.activation(x, f).unwrap();
        if noise_at == 2 {
            x = self.noise(x);
        }
        x
    }

    fn conv_block(&mut self, x: NodeId, in_residual: bool) -> NodeId {
        let out = self.rng.random_range(2..=6);
        let c = self.conv(x, out, !in_residual);
        let name = self.b.spec().nodes[c.index()].name.clone();
        self.post(c, name, in_residual)
    }

    /// A conv that keeps the spatial size (for residual branches).
    fn same_conv(&mut self, x: NodeId, out: usize) -> NodeId {
        let name = self.name("conv");
        let config = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        self.b.conv2d(&name, x, out, 3, config).unwrap()
    }

    fn block(&mut self, x: NodeId) -> NodeId {
        let NodeShape::Image {
            channels,
            height,
            width,
        } = self.b.shape(x)
        else {
            unreachable!()
        };
        match self.rng.random_range(0..6) {
            0 | 1 => self.conv_block(x, false),
            2 => {
                // Residual: conv branch (+bn, +noise) plus identity or a 1x1 projection.
                let a = self.same_conv(x, channels);
                let a = if self.rng.random_bool(0.5) {
                    self.bn(a)
                } else {
                    a
                };
                let a = self.maybe_noise(a, 0.7);
                let shortcut = if self.rng.random_bool(0.5) {
                    x
                } else {
                    let name = self.name("proj");
                    let p = self
                        .b
                        .conv2d(&name, x, channels, 1, Conv2dConfig::default())
                        .unwrap();
                    self.maybe_noise(p, 0.5)
                };
                let s = self.b.add(&[a, shortcut]).unwrap();
                let f = self.activation();
                let s = self.b.activation(s, f).unwrap();
                self.maybe_noise(s, 0.4)
            }
            3 => {
                // Concat of two conv branches of different widths.
                let width = self.rng.random_range(1..=4);
                let a = self.same_conv(x, width);
                let a = self.maybe_noise(a, 0.6);
                let width = self.rng.random_range(1..=4);
                let bb = self.same_conv(x, width);
                let bb = if self.rng.random_bool(0.5) {
                    self.bn(bb)
                } else {
                    bb
                };
                let bb = self.maybe_noise(bb, 0.6);
                let c = self.b.concat(&[a, bb]).unwrap();
                let c = self.b.relu(c).unwrap();
                self.maybe_noise(c, 0.4)
            }
            4 if height >= 4 && width >= 4 => {
                if self.rng.random_bool(0.5) {
                    self.b.max_pool2d(x, 2, 2).unwrap()
                } else {
                    self.b.avg_pool2d(x, 2, 2).unwrap()
                }
            }
            _ => {
                // Depthwise conv with noise.
                let name = self.name("dw");
                let config = Conv2dConfig {
                    padding: 1,
                    groups: channels,
                    ..Default::default()
                };
                let d = self.b.conv2d(&name, x, channels, 3, config).unwrap();
                let d = self.maybe_noise(d, 0.6);
                self.b.relu(d).unwrap()
            }
        }
    }
}

/// Builds a random network from `seed` (f32 or f64 parameters) and randomises every
/// parameter, batch-norm statistics included.
pub fn random_net(seed: u64, dtype: DType) -> Generated {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let mut rng = StdRng::seed_from_u64(seed);
    let channels = rng.random_range(1..=3);
    let size = rng.random_range(5..=9);
    let b = NetBuilder::new(NodeShape::image(channels, size, size), vb);
    let mut g = Gen {
        rng,
        b,
        count: 0,
        direct_pairs: Vec::new(),
    };
    let mut x = g.b.input();
    x = g.maybe_noise(x, 0.3);
    for _ in 0..g.rng.random_range(1..=4) {
        x = g.block(x);
    }
    x = g.b.flatten(x).unwrap();
    x = g.maybe_noise(x, 0.4);
    let hidden = g.rng.random_range(3..=8);
    let name = g.name("fc");
    let fc = g.b.linear(&name, x, hidden).unwrap();
    x = g.post(fc, name, false);
    if g.rng.random_bool(0.3) {
        let name = g.name("fc");
        let r = g.b.linear(&name, x, hidden).unwrap();
        let r = g.maybe_noise(r, 0.5);
        x = g.b.add(&[x, r]).unwrap();
    }
    let name = g.name("out");
    let out = g.b.linear(&name, x, 3).unwrap();
    let direct_pairs = g.direct_pairs;
    let net = g.b.build(out).unwrap();
    randomise(&net, seed);
    Generated {
        net,
        varmap,
        direct_pairs,
    }
}

/// Seeded random values for every parameter, with positive batch-norm variances.
pub fn randomise(net: &Net, seed: u64) {
    net.reset_parameters(seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    for (name, t) in net.named_params() {
        let n = t.elem_count();
        let values: Vec<f64> = if name.ends_with("running_var") {
            (0..n).map(|_| rng.random_range(0.3..2.0)).collect()
        } else if name.ends_with("running_mean") || name.contains("bn") {
            (0..n)
                .map(|_| {
                    rng.random_range(-0.8..0.8) + if name.ends_with("weight") { 1.0 } else { 0.0 }
                })
                .collect()
        } else {
            continue;
        };
        let fresh = Tensor::from_vec(values, t.dims(), t.device())
            .unwrap()
            .to_dtype(t.dtype())
            .unwrap();
        Var::from_tensor(&t).unwrap().set(&fresh).unwrap();
    }
}

/// Sets the noise parameters so that each unit is kept with probability `1 - p_remove`
/// (at least one per layer), with varied `E[θ]`; returns the intended keep masks.
pub fn set_noise_keeps(net: &Net, seed: u64, p_remove: f64) -> Vec<(String, Vec<bool>)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xa11ce);
    let mut out = Vec::new();
    for (_, layer) in net.noise_layers() {
        let units = layer.num_units();
        let keep = random_keep(&mut rng, units, p_remove);
        let mut mu = Vec::with_capacity(units);
        let mut ls = Vec::with_capacity(units);
        for &k in &keep {
            if k {
                mu.push(rng.random_range(-1.5..0.0));
                ls.push(rng.random_range(-4.0..-1.5));
            } else {
                mu.push(-12.0);
                ls.push(1.5);
            }
        }
        let dtype = layer.mu().dtype();
        let set = |t: &Tensor, v: Vec<f64>| {
            let fresh = Tensor::from_vec(v, units, t.device())
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            Var::from_tensor(t).unwrap().set(&fresh).unwrap();
        };
        set(layer.mu(), mu);
        set(layer.log_sigma(), ls);
        assert_eq!(
            layer.keep_mask().unwrap(),
            keep,
            "{}: SNR parameters",
            layer.name()
        );
        out.push((layer.name().to_string(), keep));
    }
    out
}

/// A random keep mask with at least one unit kept.
pub fn random_keep(rng: &mut StdRng, units: usize, p_remove: f64) -> Vec<bool> {
    let mut keep: Vec<bool> = (0..units).map(|_| !rng.random_bool(p_remove)).collect();
    if !keep.iter().any(|&k| k) {
        let j = rng.random_range(0..units);
        keep[j] = true;
    }
    keep
}

/// Largest absolute difference divided by the largest absolute reference value.
pub fn relative_error(reference: &Tensor, other: &Tensor) -> f64 {
    let r = reference.to_dtype(DType::F64).unwrap();
    let o = other.to_dtype(DType::F64).unwrap();
    max_abs(&(&r - &o).unwrap()) / max_abs(&r).max(1e-12)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The eval-mode output of `net` on `xs`, flattened (f32).
pub fn eval_values(net: &Net, xs: &Tensor) -> Vec<f32> {
    let out = net.forward_t(xs, false).unwrap();
    out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A seeded random batch for `net`.
pub fn random_input(net: &Net, batch: usize, seed: u64) -> Tensor {
    let dims = net.input_shape().dims(batch);
    let n: usize = dims.iter().product();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1234);
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// The real data: `$SBP_DATA_DIR`, else `../shared/data`. Missing data is a loud skip on a
/// developer's machine and a failure in CI.
pub fn real_data(sub: &str) -> Option<PathBuf> {
    let base = std::env::var_os("SBP_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    let dir = base.join(sub);
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have the real data, but {} is missing",
        dir.display()
    );
    eprintln!(
        "\n*** SKIPPED: {} is missing; set SBP_DATA_DIR ***\n",
        dir.display()
    );
    None
}

/// Learnable 28×28 images: class `c` lights up row `2c`.
pub fn synthetic_images(n: usize, offset: usize) -> candle_sbp::data::ImageSet {
    let mut pixels = vec![0u8; n * 784];
    let labels: Vec<u8> = (0..n).map(|i| ((i + offset) % 10) as u8).collect();
    for (i, &c) in labels.iter().enumerate() {
        for x in 0..28 {
            pixels[i * 784 + (c as usize * 2) * 28 + x] = 150 + ((i * 7 + x) % 100) as u8;
        }
    }
    candle_sbp::data::ImageSet {
        pixels,
        labels,
        channels: 1,
        height: 28,
        width: 28,
    }
}
