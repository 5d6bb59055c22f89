//! Coupling groups: the sets of parameter slices that must lose the same units together.
//!
//! A conv's output channel `c` lives on in the next batch norm's four vectors, in a noise
//! layer's `μ` and `log σ`, in the next conv's input channel `c`, in the `H×W` block of
//! columns a Linear reads after a Flatten, in both branches of a residual add, and at an
//! offset after a concat. [`coupling_groups`] finds these sets by following each unit
//! through the graph; a pruning criterion scores a group's units, and
//! [`Net::set_group_mask`] removes them everywhere at once (by masking the group's
//! producers; [`compress`](crate::compress::compress) then cuts every slice).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::net::{Net, Op};

/// A node's part in a group: which of its output units are the group's units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// The node's name.
    pub node: String,
    /// The node's index.
    pub index: usize,
    /// For each unit of the group, the node's output units that carry it (one, or an
    /// `H×W` block after a flatten).
    pub units: Vec<Vec<usize>>,
}

/// The entries of one parameter that belong to the group's units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSlice {
    /// The node's name.
    pub node: String,
    /// The parameter (`weight`, `running_mean`, `mu`, …).
    pub param: String,
    /// The axis the units index (0: rows / output channels; 1: columns / input channels).
    pub axis: usize,
    /// For each unit of the group, its indices along `axis`.
    pub indices: Vec<Vec<usize>>,
}

/// Units that must be removed together, and everything that removing them touches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouplingGroup {
    /// Number of units.
    pub units: usize,
    /// The layers (the input, Conv2d, Linear) whose output units are the group's units.
    /// A unit is gone when it is masked on every producer.
    pub producers: Vec<GroupMember>,
    /// Noise layers on the group's units (their SNR scores the units).
    pub noise: Vec<GroupMember>,
    /// Element-wise activations on the group's units (where activation statistics are
    /// gathered), in node order.
    pub activations: Vec<GroupMember>,
    /// Every parameter slice that loses a unit's entries.
    pub slices: Vec<ParamSlice>,
    /// False for the network's outputs, which are never pruned.
    pub prunable: bool,
}

struct UnionFind(Vec<usize>);

impl UnionFind {
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }
    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.0[a.max(b)] = a.min(b);
        }
    }
}

fn is_depthwise(net: &Net, i: usize) -> bool {
    let node = &net.spec().nodes[i];
    match node.op {
        Op::Conv2d { groups, .. } => groups > 1 && groups == net.shapes()[node.inputs[0]].units(),
        _ => false,
    }
}

/// The coupling groups of `net`, ordered by their first producer.
pub fn coupling_groups(net: &Net) -> Vec<CouplingGroup> {
    let spec = net.spec();
    let shapes = net.shapes();
    let n = spec.nodes.len();
    let mut offset = Vec::with_capacity(n + 1);
    offset.push(0);
    for s in shapes {
        offset.push(offset.last().expect("non-empty") + s.units());
    }
    let slot = |node: usize, unit: usize| offset[node] + unit;
    let mut uf = UnionFind((0..offset[n]).collect());
    for (i, node) in spec.nodes.iter().enumerate() {
        let units = shapes[i].units();
        match &node.op {
            Op::Input { .. } | Op::Linear { .. } => {}
            Op::Conv2d { .. } if !is_depthwise(net, i) => {}
            Op::Flatten => {
                let e = node.inputs[0];
                let p = shapes[e].positions();
                for f in 0..units {
                    uf.union(slot(i, f), slot(e, f / p));
                }
            }
            Op::Add => {
                for &e in &node.inputs {
                    for j in 0..units {
                        uf.union(slot(i, j), slot(e, j));
                    }
                }
            }
            Op::Concat => {
                let mut off = 0;
                for &e in &node.inputs {
                    for j in 0..shapes[e].units() {
                        uf.union(slot(i, off + j), slot(e, j));
                    }
                    off += shapes[e].units();
                }
            }
            Op::Select { indices } => {
                for (j, &k) in indices.iter().enumerate() {
                    uf.union(slot(i, j), slot(node.inputs[0], k));
                }
            }
            Op::Scatter { indices, .. } => {
                for (k, &j) in indices.iter().enumerate() {
                    uf.union(slot(i, j), slot(node.inputs[0], k));
                }
            }
            _ => {
                // Unit-wise nodes and depthwise convs.
                for j in 0..units {
                    uf.union(slot(i, j), slot(node.inputs[0], j));
                }
            }
        }
    }
    let is_producer = |i: usize| {
        matches!(spec.nodes[i].op, Op::Input { .. } | Op::Linear { .. })
            || (matches!(spec.nodes[i].op, Op::Conv2d { .. }) && !is_depthwise(net, i))
    };
    // Each class (a unit) with the producers it has; classes sharing producers form a group.
    let mut class_producers: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in (0..n).filter(|&i| is_producer(i)) {
        for j in 0..shapes[i].units() {
            let root = uf.find(slot(i, j));
            let list = class_producers.entry(root).or_default();
            if !list.contains(&i) {
                list.push(i);
            }
        }
    }
    let mut groups: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
    for (root, producers) in &class_producers {
        groups.entry(producers.clone()).or_default().push(*root);
    }
    // Every (node, unit) of each class.
    let mut members: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, shape) in shapes.iter().enumerate() {
        for j in 0..shape.units() {
            let root = uf.find(slot(i, j));
            if class_producers.contains_key(&root) {
                members.entry(root).or_default().push((i, j));
            }
        }
    }
    let mut out: Vec<CouplingGroup> = groups
        .into_values()
        .map(|mut roots| {
            roots.sort_by_key(|r| members[r].iter().map(|&(i, j)| slot(i, j)).min());
            build_group(net, &roots, &members)
        })
        .collect();
    out.sort_by_key(|g| g.producers.first().map(|p| (p.index, p.units[0][0])));
    out
}

fn build_group(
    net: &Net,
    roots: &[usize],
    members: &BTreeMap<usize, Vec<(usize, usize)>>,
) -> CouplingGroup {
    let spec = net.spec();
    let n = spec.nodes.len();
    let units = roots.len();
    // node → per unit → its output units.
    let mut per_node: BTreeMap<usize, Vec<Vec<usize>>> = BTreeMap::new();
    for (u, root) in roots.iter().enumerate() {
        for &(i, j) in &members[root] {
            per_node.entry(i).or_insert_with(|| vec![Vec::new(); units])[u].push(j);
        }
    }
    let member = |i: usize, units: &Vec<Vec<usize>>| GroupMember {
        node: spec.nodes[i].name.clone(),
        index: i,
        units: units.clone(),
    };
    let mut producers = Vec::new();
    let mut noise = Vec::new();
    let mut activations = Vec::new();
    let mut slices = Vec::new();
    let mut slice = |i: usize, param: &str, axis: usize, indices: &Vec<Vec<usize>>| {
        if net.param(i, param).is_some() {
            slices.push(ParamSlice {
                node: spec.nodes[i].name.clone(),
                param: param.into(),
                axis,
                indices: indices.clone(),
            });
        }
    };
    for (&i, idx) in &per_node {
        let op = &spec.nodes[i].op;
        match op {
            Op::Input { .. } => producers.push(member(i, idx)),
            Op::Conv2d { .. } | Op::Linear { .. } => {
                if !is_depthwise(net, i) {
                    producers.push(member(i, idx));
                }
                slice(i, "weight", 0, idx);
                slice(i, "bias", 0, idx);
            }
            Op::LogNormalDropout { .. } => {
                noise.push(member(i, idx));
                slice(i, "mu", 0, idx);
                slice(i, "log_sigma", 0, idx);
            }
            Op::BatchNorm { .. } => {
                for p in ["running_mean", "running_var", "weight", "bias"] {
                    slice(i, p, 0, idx);
                }
            }
            Op::Activation { .. } => activations.push(member(i, idx)),
            Op::Scale => slice(i, "scale", 0, idx),
            Op::Shift { .. } => slice(i, "shift", 0, idx),
            _ => {}
        }
        // Consumers that read these units through their weight columns.
        for (c, node) in spec.nodes.iter().enumerate() {
            if !node.inputs.contains(&i) {
                continue;
            }
            let reads_columns = matches!(node.op, Op::Linear { .. })
                || (matches!(node.op, Op::Conv2d { groups: 1, .. }));
            if reads_columns {
                slice(c, "weight", 1, idx);
            }
        }
    }
    CouplingGroup {
        units,
        prunable: !per_node.contains_key(&(n - 1)),
        producers,
        noise,
        activations,
        slices,
    }
}

impl Net {
    /// Masks the units of `group` where `keep` is false, on every producer of the group
    /// (on top of masks already set), so that [`compress`](crate::compress::compress)
    /// removes them from every slice.
    pub fn set_group_mask(&mut self, group: &CouplingGroup, keep: &[bool]) -> Result<()> {
        let first = group
            .producers
            .first()
            .map_or("<group>".to_string(), |p| p.node.clone());
        if keep.len() != group.units {
            return Err(Error::Mask {
                layer: first,
                reason: format!(
                    "{} entries for a coupling group of {} units",
                    keep.len(),
                    group.units
                ),
            });
        }
        if !group.prunable {
            return Err(Error::Mask {
                layer: first,
                reason: "this group holds the network's outputs, which are never pruned".into(),
            });
        }
        for p in &group.producers {
            let units = self.shapes()[p.index].units();
            let mut mask = self
                .mask(p.index)
                .map_or_else(|| vec![true; units], <[bool]>::to_vec);
            for (u, outs) in p.units.iter().enumerate() {
                if !keep[u] {
                    for &j in outs {
                        mask[j] = false;
                    }
                }
            }
            self.set_mask(&p.node, &mask)?;
        }
        Ok(())
    }
}
