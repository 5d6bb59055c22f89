//! Saving and loading a [`Net`] as one safetensors file that carries its architecture.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::safetensors::Load;
use candle::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};
use sha2::{Digest, Sha256};

use super::{Net, NetSpec};
use crate::error::{Error, Result};

const FORMAT: &str = "candle-sbp.net";
const FORMAT_VERSION: &str = "1";

fn format_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// SHA-256 over the architecture and masks (as stored) and every tensor's name, dtype,
/// shape and bytes, in name order.
fn digest<'a>(
    architecture: &str,
    masks: &str,
    tensors: impl Iterator<Item = (&'a str, String, &'a [usize], &'a [u8])>,
) -> String {
    let mut items: Vec<_> = tensors.collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for text in [architecture, masks] {
        h.update((text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
    }
    for (name, dtype, shape, bytes) in items {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(dtype.as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, flushed to disk, then
/// renamed over the target, so a crash never leaves a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| format_error(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

impl Net {
    /// Saves the network to one safetensors file: every parameter under its readable name
    /// (`conv1.weight`, …, loadable by plain candle-nn code), and in the file's metadata
    /// the architecture, the masks and a SHA-256 of the tensors. The write is atomic.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        // Each tensor made contiguous once; the checksum and the file read the same bytes.
        let tensors: Vec<(String, candle::Tensor)> = self
            .named_params()
            .into_iter()
            .map(|(n, t)| Ok((n, t.contiguous()?)))
            .collect::<Result<_>>()?;
        let bytes: Vec<std::borrow::Cow<[u8]>> = tensors
            .iter()
            .map(|(_, t)| safetensors::View::data(t))
            .collect();
        let architecture = self.spec.to_json()?;
        let masks = serde_json::to_string(&self.masks()).expect("bool vectors serialise");
        let sum = digest(
            &architecture,
            &masks,
            tensors
                .iter()
                .zip(&bytes)
                .map(|((n, t), b)| (n.as_str(), format!("{:?}", t.dtype()), t.dims(), &b[..])),
        );
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        meta.insert("architecture".to_string(), architecture);
        meta.insert("masks".to_string(), masks);
        meta.insert("sha256".to_string(), sum);
        let data = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
            .map_err(|e| format_error(path, format!("cannot encode: {e}")))?;
        write_atomic(path, &data)
    }

    /// Loads a network saved by [`Net::save`] from that file alone. Its parameters become
    /// variables in a fresh `VarMap` ([`Net::varmap`]), so it can be fine-tuned. A truncated,
    /// tampered or foreign file gives [`Error::Format`].
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Net> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| format_error(path, format!("not a valid safetensors file: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| format_error(path, format!("bad header: {e}")))?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| format_error(path, "no metadata: not written by candle-sbp"))?;
        let field = |key: &str| {
            meta.get(key)
                .ok_or_else(|| format_error(path, format!("metadata lacks \"{key}\"")))
        };
        if field("format")? != FORMAT {
            return Err(format_error(
                path,
                "metadata \"format\" is not candle-sbp.net",
            ));
        }
        if field("format_version")? != FORMAT_VERSION {
            return Err(format_error(
                path,
                format!("unsupported format version {}", field("format_version")?),
            ));
        }
        let views = st.tensors();
        let dtypes: Vec<DType> = views
            .iter()
            .map(|(_, v)| match v.dtype() {
                safetensors::Dtype::F32 => Ok(DType::F32),
                safetensors::Dtype::F64 => Ok(DType::F64),
                safetensors::Dtype::F16 => Ok(DType::F16),
                safetensors::Dtype::BF16 => Ok(DType::BF16),
                other => Err(format_error(path, format!("unsupported dtype {other:?}"))),
            })
            .collect::<Result<_>>()?;
        let sum = digest(
            field("architecture")?,
            field("masks")?,
            views
                .iter()
                .zip(&dtypes)
                .map(|((n, v), d)| (n.as_str(), format!("{d:?}"), v.shape(), v.data())),
        );
        if &sum != field("sha256")? {
            return Err(format_error(
                path,
                "checksum mismatch: the tensors, architecture or masks were changed after saving",
            ));
        }
        let spec = NetSpec::from_json(field("architecture")?)
            .map_err(|e| format_error(path, format!("architecture: {e}")))?;
        let masks: std::collections::BTreeMap<String, Vec<bool>> =
            serde_json::from_str(field("masks")?)
                .map_err(|e| format_error(path, format!("masks: {e}")))?;
        if dtypes.iter().any(|d| d != &dtypes[0]) {
            return Err(format_error(path, "tensors of mixed dtypes"));
        }
        let dtype = dtypes.first().copied().unwrap_or(DType::F32);
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, view) in &views {
                let t = view
                    .load(device)
                    .map_err(|e| format_error(path, format!("tensor {name}: {e}")))?;
                data.insert(name.clone(), Var::from_tensor(&t)?);
            }
        }
        let shapes = spec
            .shapes()
            .map_err(|e| format_error(path, format!("architecture: {e}")))?;
        let mut expected = std::collections::BTreeSet::new();
        for (i, node) in spec.nodes.iter().enumerate() {
            let input = node.inputs.first().map_or(shapes[i], |&j| shapes[j]);
            for p in super::param_specs(&node.op, &input, &shapes[i]) {
                let name = format!("{}.{}", node.name, p.name);
                if let Some((_, view)) = views.iter().find(|(n, _)| *n == name) {
                    if view.shape() != p.shape.as_slice() {
                        return Err(format_error(
                            path,
                            format!(
                                "tensor {name} has shape {:?} but the architecture needs {:?}",
                                view.shape(),
                                p.shape
                            ),
                        ));
                    }
                }
                expected.insert(name);
            }
        }
        let found: std::collections::BTreeSet<String> =
            views.iter().map(|(n, _)| n.clone()).collect();
        if let Some(missing) = expected.difference(&found).next() {
            return Err(format_error(path, format!("tensor {missing} is missing")));
        }
        if let Some(extra) = found.difference(&expected).next() {
            return Err(format_error(
                path,
                format!("tensor {extra} is not part of the architecture"),
            ));
        }
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let mut net = Net::new(spec, vb).map_err(|e| format_error(path, format!("{e}")))?;
        net.set_masks(&masks)
            .map_err(|e| format_error(path, format!("masks: {e}")))?;
        net.set_varmap(varmap);
        Ok(net)
    }
}

impl Net {
    /// Loads the parameters and masks saved by [`Net::save`] into this network, whose
    /// architecture must be the file's (for resuming training). Parameters must be
    /// variables.
    pub fn restore(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let saved = Net::load(path, self.device())?;
        if saved.spec() != self.spec() {
            return Err(format_error(
                path,
                "the file holds a different architecture from this network",
            ));
        }
        self.assign_params(&saved.named_params())?;
        self.set_masks(&saved.masks())
    }
}
