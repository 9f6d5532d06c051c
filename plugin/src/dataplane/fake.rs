//! A recording Dataplane for unit tests of cmd.rs: every call is logged,
//! and each operation can be told to fail.

#![cfg_attr(not(test), allow(dead_code))]

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use super::{Attached, Dataplane, DataplaneError, PodLink};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Setup(PodLink),
    Teardown {
        host_veth: String,
        netns: Option<PathBuf>,
        ifname: String,
    },
    Check(PodLink),
}

/// Builds the error a failing operation returns; a closure because
/// DataplaneError is not Clone.
pub type Failure = Box<dyn Fn() -> DataplaneError>;

#[derive(Default)]
pub struct FakeDataplane {
    pub calls: RefCell<Vec<Call>>,
    pub fail_setup: Option<Failure>,
    pub fail_teardown: Option<Failure>,
    pub fail_check: Option<Failure>,
}

pub const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
pub const POD_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

impl FakeDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    pub fn teardowns(&self) -> usize {
        self.calls
            .borrow()
            .iter()
            .filter(|c| matches!(c, Call::Teardown { .. }))
            .count()
    }
}

impl Dataplane for FakeDataplane {
    fn setup(&self, link: &PodLink) -> Result<Attached, DataplaneError> {
        self.calls.borrow_mut().push(Call::Setup(link.clone()));
        if let Some(fail) = &self.fail_setup {
            return Err(fail());
        }
        Ok(Attached {
            host_mac: HOST_MAC,
            pod_mac: POD_MAC,
        })
    }

    fn teardown(
        &self,
        host_veth: &str,
        netns: Option<&Path>,
        ifname: &str,
    ) -> Result<(), DataplaneError> {
        self.calls.borrow_mut().push(Call::Teardown {
            host_veth: host_veth.to_string(),
            netns: netns.map(Path::to_path_buf),
            ifname: ifname.to_string(),
        });
        match &self.fail_teardown {
            Some(fail) => Err(fail()),
            None => Ok(()),
        }
    }

    fn check(&self, link: &PodLink) -> Result<(), DataplaneError> {
        self.calls.borrow_mut().push(Call::Check(link.clone()));
        match &self.fail_check {
            Some(fail) => Err(fail()),
            None => Ok(()),
        }
    }
}
