//! What the stages that read models share: where a model comes from (a directory, another
//! stage's output, or a seeded initialisation), what a model directory holds, and the device
//! that runs it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail};
use pipe_core::diag::{FieldError, Target};
use pipe_core::{Input, InputSource, ParseContext};
use pipe_model::ModelConfig;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A `model:` field: a stage or directory holding a checkpoint, or `{init: {…config.json
/// fields…}, seed: N}` for a model initialised from a seed.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub(crate) enum ModelField {
    Source(String),
    Init {
        init: serde_json::Value,
        #[serde(default)]
        seed: u64,
    },
}

/// A parsed `model:` field.
#[derive(Debug, Clone)]
pub(crate) enum ModelSource {
    /// Read from the stage input of this name.
    Input(String),
    Init {
        config: Box<ModelConfig>,
        seed: u64,
    },
}

/// The config of the model `model` names, when it is known before anything runs: an `init:`
/// config, a local model directory's config.json, a download of one, or a train stage's own
/// `init:` model (for `pipe check`'s memory plans).
pub(crate) fn known_config<'a>(
    model: &ModelSource,
    inputs: &[Input],
    stage: &dyn Fn(&str) -> Option<pipe_core::StageInfo<'a>>,
) -> Option<ModelConfig> {
    let name = match model {
        ModelSource::Init { config, .. } => return Some(config.as_ref().clone()),
        ModelSource::Input(name) => name,
    };
    let input = inputs.iter().find(|i| &i.name == name)?;
    let dir = match &input.source {
        InputSource::Path(dir) => dir.clone(),
        InputSource::Stage { stage: id, .. } => {
            let up = stage(id)?;
            match up.kind {
                "train" => {
                    let config = &up.fields["init"]["config"];
                    return serde_json::from_value(config.clone()).ok();
                }
                "download" => match &up.inputs.first()?.source {
                    InputSource::Path(dir) => dir.clone(),
                    InputSource::Stage { .. } => return None,
                },
                _ => return None,
            }
        }
    };
    match find_weights(&dir).ok()? {
        Weights::Model(d) => ModelConfig::from_file(&d.join("config.json")).ok(),
        Weights::Adapter(_) => None,
    }
}

/// A model initialised from a config (as config.json spells it) and a seed.
#[derive(Serialize)]
pub(crate) struct InitKey<'a> {
    pub(crate) config: &'a pipe_model::ModelConfig,
    pub(crate) seed: u64,
}

impl<'a> InitKey<'a> {
    /// The key of a seeded initialisation; `None` for a checkpoint (an input).
    pub(crate) fn of(model: &'a ModelSource) -> Option<Self> {
        match model {
            ModelSource::Init { config, seed } => Some(InitKey {
                config,
                seed: *seed,
            }),
            ModelSource::Input(_) => None,
        }
    }
}

impl ModelField {
    /// Reads the field `field` of the stage; a checkpoint becomes the input `field`.
    pub(crate) fn parse(
        &self,
        cx: &ParseContext<'_>,
        field: &str,
        inputs: &mut Vec<Input>,
    ) -> Result<ModelSource, FieldError> {
        match self {
            ModelField::Source(s) => {
                let source = cx
                    .as_stage_ref(s)
                    .unwrap_or_else(|| InputSource::Path(cx.resolve_path(s)));
                inputs.push(Input {
                    name: field.into(),
                    source,
                    field: cx.path.key(field),
                });
                Ok(ModelSource::Input(field.into()))
            }
            ModelField::Init { init, seed } => {
                let init_error =
                    |e: String| FieldError::new(cx.path.key(field).key("init"), Target::Value, e);
                let config = ModelConfig::from_json(&init.to_string())
                    .map_err(|e| init_error(e.to_string()))?;
                check_fits_in_memory(&config).map_err(init_error)?;
                Ok(ModelSource::Init {
                    config: Box::new(config),
                    seed: *seed,
                })
            }
        }
    }
}

/// A seeded model is made whole in memory: one whose f32 weights alone exceed this machine's
/// memory could only end in a failed allocation, which aborts the process.
fn check_fits_in_memory(config: &ModelConfig) -> Result<(), String> {
    let bytes = config.parameter_count() * 4;
    let memory = physical_memory();
    if bytes > memory as u128 {
        return Err(format!(
            "this model has {} parameters, {:.1} GB as f32: more than this machine's memory ({:.1} GB)",
            config.parameter_count(),
            bytes as f64 / 1e9,
            memory as f64 / 1e9
        ));
    }
    Ok(())
}

/// The machine's physical memory in bytes.
fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(page)) {
        (Ok(pages), Ok(page)) if pages > 0 && page > 0 => pages.saturating_mul(page),
        _ => u64::MAX,
    }
}

/// What a model input holds: a full model directory or a LoRA adapter directory.
pub(crate) enum Weights {
    Model(PathBuf),
    Adapter(PathBuf),
}

/// Finds the weights in `dir`, or in its `model/` or `adapter/` (a train stage's outputs).
pub(crate) fn find_weights(dir: &Path) -> anyhow::Result<Weights> {
    for d in [dir.to_path_buf(), dir.join("model"), dir.join("adapter")] {
        if d.join("adapter_config.json").exists() {
            return Ok(Weights::Adapter(d));
        }
        if d.join("config.json").exists() {
            return Ok(Weights::Model(d));
        }
    }
    bail!(
        "{} holds neither a model (config.json) nor a LoRA adapter (adapter_config.json)",
        dir.display()
    )
}

/// Where a stage's tensor work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The device a field names (`cpu`, `cuda` = `cuda:0`, `cuda:N`), without looking for it;
    /// a GPU only in a build that can use one.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let device = match text {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Device::Cuda(index),
                _ => return Err(format!("unknown device `{text}` (cpu, cuda, cuda:N)")),
            },
        };
        if device != Device::Cpu && !cfg!(feature = "cuda") {
            return Err(format!(
                "`{text}` needs a pipe built with the `cuda` feature, which this one is not: build it with `cargo build --release --features cuda`, or use `cpu`"
            ));
        }
        Ok(device)
    }

    /// The device to run on: a GPU needs a build with the `cuda` feature and a driver.
    pub(crate) fn open(text: &str) -> anyhow::Result<Self> {
        let index = match Self::parse(text).map_err(|e| anyhow!(e))? {
            Device::Cpu => return Ok(Device::Cpu),
            Device::Cuda(index) => index,
        };
        check_gpu_index(text, index, cuda_device_count()?)?;
        Ok(Device::Cuda(index))
    }
}

/// The memory `device` has free, named for messages (`cuda:0`, `this machine`): the driver's
/// count on a GPU, available memory (or a lower cgroup limit) on the CPU. `None` where it
/// cannot be read, which is logged: the stage then runs unchecked.
pub(crate) fn free_memory(cx: &pipe_core::StageContext, device: Device) -> Option<(String, u64)> {
    let (place, available) = match device {
        Device::Cuda(index) => (format!("cuda:{index}"), cuda_free_memory(index)),
        Device::Cpu => (
            "this machine".to_string(),
            pipe_train::memory::available_cpu_memory(),
        ),
    };
    if available.is_none() {
        cx.log(&format!(
            "the free memory of {place} could not be read: not checked"
        ));
    }
    Some((place, available?))
}

/// The GPUs the devices named in `device:`/`devices:` occupy, as the stage's resources (a
/// CPU-only stage needs none).
pub(crate) fn gpu_resources<'a>(
    devices: impl IntoIterator<Item = &'a str>,
) -> pipe_core::resources::Resources {
    // Read as `Device::parse` does, without its build check: what a field names is known
    // whatever the build (a CPU build refuses such a stage when it checks it).
    let gpus: std::collections::BTreeSet<usize> = devices
        .into_iter()
        .filter_map(|d| match d {
            "cuda" => Some(0),
            _ => d.strip_prefix("cuda:")?.parse().ok(),
        })
        .collect();
    pipe_core::resources::Resources {
        gpus: (!gpus.is_empty()).then_some(pipe_core::resources::Gpus::Devices(gpus)),
        ..Default::default()
    }
}

/// `cuda:index` must be one of the `count` GPUs the driver shows this process.
fn check_gpu_index(text: &str, index: usize, count: usize) -> anyhow::Result<()> {
    match count {
        0 => bail!(
            "`device: {text}`: the NVIDIA driver sees no GPU (check `nvidia-smi` and CUDA_VISIBLE_DEVICES), or use `device: cpu`"
        ),
        n if index >= n => bail!(
            "`device: {text}` does not exist: the NVIDIA driver shows {n} GPU{} to this process (cuda:0{}); check CUDA_VISIBLE_DEVICES",
            if n == 1 { "" } else { "s" },
            if n == 1 { String::new() } else { format!(" … cuda:{}", n - 1) },
        ),
        _ => Ok(()),
    }
}

/// How many GPUs the NVIDIA driver shows this process (honouring `CUDA_VISIBLE_DEVICES`, as
/// burn-cuda will). burn-cuda panics inside a device thread when the driver is missing or a GPU
/// index does not exist, so this is asked first, once per process.
fn cuda_device_count() -> anyhow::Result<usize> {
    static COUNT: OnceLock<Result<usize, String>> = OnceLock::new();
    COUNT
        .get_or_init(|| ask_driver_for_device_count().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The NVIDIA driver library (its name and dlopen handle), if it can be loaded.
fn open_driver() -> Option<(&'static std::ffi::CStr, *mut libc::c_void)> {
    [c"libcuda.so.1", c"libcuda.so"]
        .into_iter()
        .find_map(|lib| {
            // SAFETY: dlopen with a valid C string. The handle is never closed: burn-cuda loads the
            // same library, and an initialised driver must not be unloaded under it.
            let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
            (!h.is_null()).then_some((lib, h))
        })
}

fn ask_driver_for_device_count() -> anyhow::Result<usize> {
    const CUDA_SUCCESS: i32 = 0;
    const CUDA_ERROR_NO_DEVICE: i32 = 100;
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    let Some((lib, handle)) = open_driver() else {
        bail!(
            "no NVIDIA driver found (libcuda.so.1 cannot be loaded): is there a GPU with its driver installed? Use `device: cpu` otherwise"
        )
    };
    // SAFETY: the handle is live and never closed.
    let (init, get_count) = unsafe {
        (
            libc::dlsym(handle, c"cuInit".as_ptr()),
            libc::dlsym(handle, c"cuDeviceGetCount".as_ptr()),
        )
    };
    if init.is_null() || get_count.is_null() {
        bail!(
            "{} is not an NVIDIA driver (it lacks cuInit/cuDeviceGetCount)",
            lib.to_string_lossy()
        );
    }
    // SAFETY: these are the CUDA driver API's `CUresult cuInit(unsigned int)` and
    // `CUresult cuDeviceGetCount(int*)`; both may be called any number of times.
    let (init, get_count) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, CuInit>(init),
            std::mem::transmute::<*mut libc::c_void, CuDeviceGetCount>(get_count),
        )
    };
    let mut count = 0i32;
    // SAFETY: see above; `count` outlives the call.
    match unsafe { init(0) } {
        CUDA_SUCCESS => {}
        CUDA_ERROR_NO_DEVICE => return Ok(0),
        code => bail!(
            "the NVIDIA driver failed to start (cuInit returned CUresult {code}); `nvidia-smi` tells whether the GPU and its driver are healthy"
        ),
    }
    // SAFETY: as above.
    match unsafe { get_count(&mut count) } {
        CUDA_SUCCESS => Ok(usize::try_from(count).unwrap_or(0)),
        code => bail!("the NVIDIA driver could not count the GPUs (CUresult {code})"),
    }
}

/// Bytes free on GPU `index` as the driver counts them (`cuMemGetInfo` in the device's primary
/// context, the one burn-cuda then uses), or `None` when the driver cannot say: the memory
/// check is then skipped rather than a run refused on a guess.
pub(crate) fn cuda_free_memory(index: usize) -> Option<u64> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type CuPrimaryCtxRetain = unsafe extern "C" fn(*mut *mut libc::c_void, i32) -> i32;
    type CuPrimaryCtxRelease = unsafe extern "C" fn(i32) -> i32;
    type CuCtxPush = unsafe extern "C" fn(*mut libc::c_void) -> i32;
    type CuCtxPop = unsafe extern "C" fn(*mut *mut libc::c_void) -> i32;
    type CuMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    let (_, handle) = open_driver()?;
    let symbol = |name: &std::ffi::CStr| {
        // SAFETY: the handle is live and never closed.
        let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    let init = symbol(c"cuInit")?;
    let device_get = symbol(c"cuDeviceGet")?;
    let retain = symbol(c"cuDevicePrimaryCtxRetain")?;
    let release = symbol(c"cuDevicePrimaryCtxRelease_v2")?;
    let push = symbol(c"cuCtxPushCurrent_v2")?;
    let pop = symbol(c"cuCtxPopCurrent_v2")?;
    let mem_get_info = symbol(c"cuMemGetInfo_v2")?;
    // SAFETY: each pointer is the CUDA driver API function of that name, with the signature of
    // its type above (cuda.h, API version 3020 and later: the `_v2` names).
    unsafe {
        let init = std::mem::transmute::<*mut libc::c_void, CuInit>(init);
        let device_get = std::mem::transmute::<*mut libc::c_void, CuDeviceGet>(device_get);
        let retain = std::mem::transmute::<*mut libc::c_void, CuPrimaryCtxRetain>(retain);
        let release = std::mem::transmute::<*mut libc::c_void, CuPrimaryCtxRelease>(release);
        let push = std::mem::transmute::<*mut libc::c_void, CuCtxPush>(push);
        let pop = std::mem::transmute::<*mut libc::c_void, CuCtxPop>(pop);
        let mem_get_info = std::mem::transmute::<*mut libc::c_void, CuMemGetInfo>(mem_get_info);
        let mut device = 0i32;
        if init(0) != 0 || device_get(&mut device, i32::try_from(index).ok()?) != 0 {
            return None;
        }
        let mut context = std::ptr::null_mut();
        if retain(&mut context, device) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        let ok = push(context) == 0 && {
            let asked = mem_get_info(&mut free, &mut total) == 0;
            let mut popped = std::ptr::null_mut();
            pop(&mut popped);
            asked
        };
        release(device);
        ok.then_some(free as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_build_without_cuda_refuses_gpu_devices() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        for gpu in ["cuda", "cuda:1"] {
            let e = Device::parse(gpu).unwrap_err();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }

    #[test]
    fn a_gpu_index_must_be_one_the_driver_shows() {
        assert!(check_gpu_index("cuda", 0, 1).is_ok());
        assert!(check_gpu_index("cuda:7", 7, 8).is_ok());
        let one = check_gpu_index("cuda:1", 1, 1).unwrap_err().to_string();
        assert!(one.contains("`device: cuda:1` does not exist"), "{one}");
        assert!(
            one.contains("shows 1 GPU to this process (cuda:0)"),
            "{one}"
        );
        let four = check_gpu_index("cuda:4", 4, 4).unwrap_err().to_string();
        assert!(
            four.contains("shows 4 GPUs to this process (cuda:0 … cuda:3)"),
            "{four}"
        );
        let none = check_gpu_index("cuda", 0, 0).unwrap_err().to_string();
        assert!(none.contains("sees no GPU"), "{none}");
    }
}

#[cfg(test)]
mod resource_tests {
    use super::gpu_resources;
    use pipe_core::resources::Gpus;

    #[test]
    fn the_gpus_of_devices_are_the_stage_resources() {
        assert_eq!(gpu_resources(["cpu"]).gpus, None);
        assert_eq!(
            gpu_resources(["cuda", "cuda:3"]).gpus,
            Some(Gpus::Devices([0, 3].into()))
        );
    }
}
