//! The coverage self-check: is every pod on this node behind the DNAT's interface match?
//!
//! A wrong `--host-interface` fails silently: the pods behind other interfaces reach the
//! node's metadata service directly. So for every pod it serves, iamlet asks the kernel
//! (`RTM_GETROUTE`, policy rules included, as `ip route get` does) which interface reaches
//! the pod's IP — the one its traffic arrives on — and whether the match in force covers it.
//! A pod that is not covered is logged once, counted in `iamlet_pods_not_intercepted`, and
//! given a Warning Event (`IAMNotIntercepted`), so `kubectl describe pod` shows it too.

use std::collections::HashMap;
use std::net::IpAddr;

use std::time::Duration;

use futures::TryStreamExt;
use prometheus_client::metrics::gauge::Gauge;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::RouteAttribute;
use tokio::sync::watch;

use super::RulesState;
use super::interfaces::InterfaceMatch;

/// Route lookups through the kernel's routing tables.
pub struct Routes {
    handle: rtnetlink::Handle,
}

impl Routes {
    /// Opens a netlink socket (its task runs on the current runtime).
    pub fn open() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The name of the interface the kernel routes `ip` through.
    pub async fn interface_to(&self, ip: IpAddr) -> Result<String, String> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let message =
            RouteMessageBuilder::<IpAddr>::new().destination_prefix(ip, prefix).map_err(|e| e.to_string())?.build();
        let mut answers = self.handle.route().get(message).execute();
        while let Some(route) = answers.try_next().await.map_err(|e| format!("route lookup for {ip}: {e}"))? {
            let index = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            });
            if let Some(index) = index {
                return nix::net::if_::if_indextoname(index)
                    .map(|name| name.to_string_lossy().into_owned())
                    .map_err(|e| format!("interface {index}: {e}"));
            }
        }
        Err(format!("no route to {ip}"))
    }
}

/// One pod as the check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub uid: String,
    /// `namespace/name`, for the log.
    pub pod: String,
    pub ip: IpAddr,
}

/// A pod the DNAT does not cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncovered {
    pub uid: String,
    /// `namespace/name`.
    pub pod: String,
    pub ip: IpAddr,
    pub interface: String,
}

/// Which pods were found uncovered, so each is logged once (again only after it was
/// covered in between), and forgotten when it leaves.
#[derive(Debug, Default)]
pub struct Coverage {
    uncovered: HashMap<String, String>,
}

impl Coverage {
    /// Takes one round of lookups (`None`: the lookup failed, so nothing is concluded for that
    /// pod); returns how many pods are uncovered now and those that newly are.
    pub fn update(
        &mut self,
        interfaces: &InterfaceMatch,
        round: Vec<(Probe, Option<String>)>,
    ) -> (usize, Vec<Uncovered>) {
        let mut now = HashMap::new();
        let mut new = Vec::new();
        for (probe, link) in round {
            let link = match link {
                Some(link) => link,
                None => match self.uncovered.get(&probe.uid) {
                    Some(previous) => previous.clone(),
                    None => continue,
                },
            };
            if interfaces.matches(&link) {
                continue;
            }
            if self.uncovered.get(&probe.uid) != Some(&link) {
                new.push(Uncovered {
                    uid: probe.uid.clone(),
                    pod: probe.pod.clone(),
                    ip: probe.ip,
                    interface: link.clone(),
                });
            }
            now.insert(probe.uid, link);
        }
        self.uncovered = now;
        (self.uncovered.len(), new)
    }
}

/// Checks every `period`, once the rules are installed, that each pod `probes` lists is
/// behind the interfaces they match; logs each uncovered pod once, hands it to `report` (the
/// pod's Warning Event) and keeps `gauge` current.
pub async fn run(
    rules: watch::Receiver<RulesState>,
    probes: impl Fn() -> Vec<Probe> + Send + 'static,
    report: impl Fn(&Uncovered, &InterfaceMatch) + Send + 'static,
    gauge: Gauge,
    period: Duration,
) {
    let routes = match Routes::open() {
        Ok(routes) => routes,
        Err(error) => {
            tracing::warn!(%error, "cannot open a netlink socket: pods' interfaces are not checked");
            return;
        }
    };
    let mut coverage = Coverage::default();
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(interfaces) = rules.borrow().interfaces().cloned() else { continue };
        let mut round = Vec::new();
        for probe in probes() {
            let link = routes.interface_to(probe.ip).await;
            if let Err(error) = &link {
                tracing::debug!(pod = %probe.pod, %error, "cannot tell the pod's interface");
            }
            round.push((probe, link.ok()));
        }
        let (count, new) = coverage.update(&interfaces, round);
        gauge.set(count as i64);
        for pod in new {
            tracing::warn!(
                pod = %pod.pod, ip = %pod.ip, interface = %pod.interface, host_interface = %interfaces,
                "pod is not intercepted: its traffic arrives on an interface the DNAT rule does not match, so it \
                 reaches the node's metadata service directly; fix --host-interface"
            );
            report(&pod, &interfaces);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(uid: &str, ip: &str) -> Probe {
        Probe { uid: uid.into(), pod: format!("ns/{uid}"), ip: ip.parse().unwrap() }
    }

    #[test]
    fn reports_each_uncovered_pod_once_and_forgets_it_when_gone() {
        let cali = InterfaceMatch::parse("cali+").unwrap();
        let mut coverage = Coverage::default();
        let round = || {
            vec![
                (probe("a", "10.0.0.1"), Some("cali1".to_string())),
                (probe("b", "10.0.0.2"), Some("ext0".to_string())),
            ]
        };
        let (count, new) = coverage.update(&cali, round());
        assert_eq!(count, 1);
        let b = Uncovered {
            uid: "b".into(),
            pod: "ns/b".into(),
            ip: "10.0.0.2".parse().unwrap(),
            interface: "ext0".into(),
        };
        assert_eq!(new, [b]);
        assert_eq!(coverage.update(&cali, round()), (1, vec![]), "logged once");
        let (count, new) = coverage.update(&cali, vec![(probe("b", "10.0.0.2"), None)]);
        assert_eq!((count, new.len()), (1, 0), "a failed lookup concludes nothing");
        assert_eq!(coverage.update(&cali, vec![(probe("a", "10.0.0.1"), Some("cali1".into()))]), (0, vec![]));
        assert_eq!(coverage.update(&cali, round()).1.len(), 1, "back again: logged again");
    }

    #[tokio::test]
    async fn asks_the_kernel_which_interface_reaches_an_address() {
        let routes = Routes::open().unwrap();
        assert_eq!(routes.interface_to("127.0.0.7".parse().unwrap()).await.unwrap(), "lo");
    }
}
