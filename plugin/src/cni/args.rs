//! CNI_ARGS: `K=V;K=V`, as libcni's convention defines it. Unknown keys are
//! an error unless `IgnoreUnknown` is true, which every Kubernetes runtime
//! sets next to its `K8S_POD_*` keys.

use std::net::Ipv4Addr;

use super::error::{CniError, code};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
    /// From `IP=`, comma-separated, any `/prefix` stripped.
    pub ips: Vec<Ipv4Addr>,
}

pub fn parse(raw: &str) -> Result<CniArgs, CniError> {
    let mut args = CniArgs::default();
    let mut ignore_unknown = false;
    let mut unknown = Vec::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            ));
        };
        let owned = || Some(value.to_string()).filter(|v| !v.is_empty());
        match key {
            "K8S_POD_NAMESPACE" => args.pod_namespace = owned(),
            "K8S_POD_NAME" => args.pod_name = owned(),
            "K8S_POD_UID" => args.pod_uid = owned(),
            "K8S_POD_INFRA_CONTAINER_ID" => args.infra_container_id = owned(),
            "IP" => {
                for ip in value.split(',').filter(|s| !s.is_empty()) {
                    let ip = parse_requested_ip(ip).map_err(|why| {
                        CniError::new(code::INVALID_ENV, format!("CNI_ARGS IP={ip}: {why}"))
                    })?;
                    args.ips.push(ip);
                }
            }
            "IgnoreUnknown" => {
                ignore_unknown = value == "1" || value.eq_ignore_ascii_case("true");
            }
            other => unknown.push(other.to_string()),
        }
    }
    if !unknown.is_empty() && !ignore_unknown {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_ARGS: unknown key(s) {} (set IgnoreUnknown=1 to allow them)",
                unknown.join(", ")
            ),
        ));
    }
    Ok(args)
}

/// A requested address: `a.b.c.d` or `a.b.c.d/len` (the prefix means
/// nothing to ferry, every pod address is a /32). IPv6 is refused.
pub fn parse_requested_ip(s: &str) -> Result<Ipv4Addr, String> {
    let addr = s.split_once('/').map_or(s, |(a, _)| a).trim();
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => Ok(v4),
        Ok(std::net::IpAddr::V6(_)) => Err("ferry allocates IPv4 addresses only".into()),
        Err(_) => Err(format!("{s:?} is not an IP address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_args_parse() {
        let a = parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
        )
        .unwrap();
        assert_eq!(a.pod_namespace.as_deref(), Some("ns"));
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc"));
        assert!(a.ips.is_empty());
    }

    #[test]
    fn empty_and_trailing_separators_are_fine() {
        assert_eq!(parse("").unwrap(), CniArgs::default());
        assert_eq!(
            parse("K8S_POD_NAME=a;;").unwrap().pod_name.as_deref(),
            Some("a")
        );
    }

    #[test]
    fn ip_strips_prefix_and_accepts_a_list() {
        let a = parse("IP=10.1.2.3/24,10.1.2.4").unwrap();
        assert_eq!(
            a.ips,
            vec![Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 1, 2, 4)]
        );
    }

    #[test]
    fn bad_args_are_code_4() {
        for raw in [
            "IP=banana",
            "IP=fd00::1",
            "novalue",
            "FOO=bar",
            "FOO=1;IgnoreUnknown=0",
        ] {
            assert_eq!(parse(raw).unwrap_err().code, 4, "{raw}");
        }
    }

    #[test]
    fn ignore_unknown_may_come_last() {
        assert!(parse("FOO=bar;IgnoreUnknown=true").is_ok());
    }
}
