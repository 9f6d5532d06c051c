//! [`OneNode`]: the world most single-node tests start from.

use anyhow::Result;
use serde_json::Value;

use crate::cni::{Cni, Runtime, conflist, ferry_plugin_conf};
use crate::ipamd::{Ipamd, IpamdConfig};
use crate::netns::{Fabric, Node};

/// A fabric, one node running ipamd, a libcni-style runtime on that node and
/// a conflist (cniVersion 1.1.0) holding ferry alone.
///
/// Fields drop in order: the runtime, ipamd (killed by PID), then the node
/// and fabric namespaces.
pub struct OneNode {
    pub rt: Runtime,
    pub list: Value,
    pub ipamd: Ipamd,
    pub node: Node,
    pub fabric: Fabric,
}

impl OneNode {
    pub fn start(cfg: IpamdConfig) -> Result<OneNode> {
        let fabric = Fabric::new()?;
        let node = fabric.add_node()?;
        let ipamd = Ipamd::start(&node, cfg)?;
        let rt = Runtime::new(Cni::new(&node));
        let list = conflist(
            "1.1.0",
            "ferry-e2e",
            vec![ferry_plugin_conf(ipamd.socket())],
        );
        Ok(OneNode {
            rt,
            list,
            ipamd,
            node,
            fabric,
        })
    }
}
