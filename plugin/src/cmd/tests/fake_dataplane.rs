//! A recording Dataplane for unit tests of cmd.rs: every call is logged,
//! and each operation can be told to fail.

use std::sync::Mutex;

use ferry::dataplane::{Attached, Dataplane, DataplaneError, PodLink};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Setup(PodLink),
    Teardown { host_veth: String },
    LinkIndex { host_veth: String },
    Check(PodLink),
}

/// Builds the error a failing operation returns; a closure because
/// DataplaneError is not Clone.
pub type Failure = Box<dyn Fn() -> DataplaneError + Send + Sync>;

#[derive(Default)]
pub struct FakeDataplane {
    pub calls: Mutex<Vec<Call>>,
    pub fail_setup: Option<Failure>,
    pub fail_teardown: Option<Failure>,
    pub fail_check: Option<Failure>,
    /// What `host_link_index` answers; `None`: no such link.
    pub host_index: Option<u32>,
}

pub const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
pub const POD_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

impl FakeDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn calls(&self) -> Vec<Call> {
        self.log().clone()
    }

    pub fn teardowns(&self) -> usize {
        self.log()
            .iter()
            .filter(|c| matches!(c, Call::Teardown { .. }))
            .count()
    }
}

impl Dataplane for FakeDataplane {
    fn setup(&self, link: &PodLink) -> Result<Attached, DataplaneError> {
        self.log().push(Call::Setup(link.clone()));
        if let Some(fail) = &self.fail_setup {
            return Err(fail());
        }
        Ok(Attached {
            host_mac: HOST_MAC,
            pod_mac: POD_MAC,
        })
    }

    fn teardown(&self, host_veth: &str) -> Result<(), DataplaneError> {
        self.log().push(Call::Teardown {
            host_veth: host_veth.to_string(),
        });
        match &self.fail_teardown {
            Some(fail) => Err(fail()),
            None => Ok(()),
        }
    }

    fn host_link_index(&self, host_veth: &str) -> Result<Option<u32>, DataplaneError> {
        self.log().push(Call::LinkIndex {
            host_veth: host_veth.to_string(),
        });
        Ok(self.host_index)
    }

    fn check(&self, link: &PodLink) -> Result<(), DataplaneError> {
        self.log().push(Call::Check(link.clone()));
        match &self.fail_check {
            Some(fail) => Err(fail()),
            None => Ok(()),
        }
    }
}
