//! Where webhooks may be delivered: one address policy, applied when a webhook is
//! registered and again at every delivery.
//!
//! A webhook URL is chosen by an integrator, so without a policy the server would
//! POST to whatever it can reach: its own loopback services, the private network it
//! runs in, a cloud metadata endpoint. Only public unicast addresses are allowed,
//! unless [`AddressPolicy::allow_private`] is set (a development receiver on this
//! machine). Every spelling of an address is judged by where it leads: IPv6 forms that
//! carry an IPv4 address (mapped, translated, NAT64, 6to4) are judged by that IPv4
//! address, and forms that cannot be judged (Teredo, local-use NAT64, IPv4-compatible)
//! are refused.
//!
//! A host name is judged by every address it resolves to: one disallowed answer
//! refuses the name (a rebinding name that answers a public and a private address
//! would otherwise reach the private one on some tries). At delivery the HTTP client
//! resolves through [`PolicyResolver`], so it connects to exactly the addresses that
//! were checked, with no second look-up between the check and the connect.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// How long a name may take to resolve before it is refused: a slow DNS server never
/// holds a registration or a delivery for longer.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a URL or host is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The URL is not an `http(s)` URL with a host.
    NotHttp,
    /// The host is, or resolves to, an address the policy refuses.
    NotPublic,
    /// The name has no address (or is a name that never has one, like `*.invalid`).
    DoesNotResolve,
    /// The name did not resolve within [`LOOKUP_TIMEOUT`].
    LookupTimedOut,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::NotHttp => "not an http(s) URL with a host",
            Refusal::NotPublic => "not a public address",
            Refusal::DoesNotResolve => "the host name does not resolve",
            Refusal::LookupTimedOut => "the host name did not resolve in time",
        })
    }
}

impl std::error::Error for Refusal {}

/// The future a [`Lookup`] returns.
pub type Lookups<'a> = Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Turns a host name into addresses. [`SystemLookup`] asks the operating system;
/// tests give their own (e.g. [`StaticLookup`]) to map names without touching DNS.
pub trait Lookup: Send + Sync {
    /// Every address of `host` (a name, never an IP literal).
    fn lookup<'a>(&'a self, host: &'a str) -> Lookups<'a>;
}

/// The operating system's resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup<'a>(&'a self, host: &'a str) -> Lookups<'a> {
        Box::pin(async move {
            // The port is required by the API and ignored by the answer we keep.
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// A fixed table of names and their addresses; a name not in it does not resolve.
#[derive(Clone, Debug, Default)]
pub struct StaticLookup {
    names: HashMap<String, Vec<IpAddr>>,
}

impl StaticLookup {
    /// A table from `(name, addresses)` pairs (names compared without case).
    pub fn new<N, A>(entries: impl IntoIterator<Item = (N, A)>) -> StaticLookup
    where
        N: Into<String>,
        A: IntoIterator<Item = IpAddr>,
    {
        StaticLookup {
            names: entries
                .into_iter()
                .map(|(n, a)| (n.into().to_ascii_lowercase(), a.into_iter().collect()))
                .collect(),
        }
    }
}

impl Lookup for StaticLookup {
    fn lookup<'a>(&'a self, host: &'a str) -> Lookups<'a> {
        let found = self.names.get(&host.to_ascii_lowercase()).cloned();
        Box::pin(async move {
            found.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
        })
    }
}

/// Which webhook addresses are allowed, and how names are resolved.
#[derive(Clone)]
pub struct AddressPolicy {
    allow_private: bool,
    lookup: Arc<dyn Lookup>,
    timeout: Duration,
}

impl std::fmt::Debug for AddressPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressPolicy")
            .field("allow_private", &self.allow_private)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Default for AddressPolicy {
    /// Public addresses only, names resolved by the system.
    fn default() -> Self {
        AddressPolicy::new(false)
    }
}

impl AddressPolicy {
    /// Public addresses only unless `allow_private` (then any address, for a
    /// development receiver), names resolved by the system within [`LOOKUP_TIMEOUT`].
    pub fn new(allow_private: bool) -> AddressPolicy {
        AddressPolicy {
            allow_private,
            lookup: Arc::new(SystemLookup),
            timeout: LOOKUP_TIMEOUT,
        }
    }

    /// The same policy resolving names with `lookup`.
    pub fn with_lookup(self, lookup: Arc<dyn Lookup>) -> AddressPolicy {
        AddressPolicy { lookup, ..self }
    }

    /// Whether loopback, private and other non-public addresses are allowed.
    pub fn allow_private(&self) -> bool {
        self.allow_private
    }

    /// Whether a delivery may connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip)
    }

    /// Checks a webhook URL as at registration: an `http(s)` URL whose host is an
    /// allowed address, or a name all of whose addresses are allowed.
    pub async fn check_url(&self, url: &url::Url) -> Result<(), Refusal> {
        match url_host(url)? {
            url::Host::Domain(name) => self.resolve(name).await.map(drop),
            url::Host::Ipv4(ip) => self.check_ip(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => self.check_ip(IpAddr::V6(ip)),
        }
    }

    /// Checks the host of `url` if it is an IP literal, which the HTTP client connects
    /// to without asking a resolver; names are left to [`PolicyResolver`].
    pub fn check_literal(&self, url: &url::Url) -> Result<(), Refusal> {
        match url_host(url)? {
            url::Host::Domain(_) => Ok(()),
            url::Host::Ipv4(ip) => self.check_ip(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => self.check_ip(IpAddr::V6(ip)),
        }
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.allows(ip) {
            Ok(())
        } else {
            Err(Refusal::NotPublic)
        }
    }

    /// Every address of the name `host`, if all of them are allowed.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, Refusal> {
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        // RFC 6761: these names are loopback, or never exist, whatever a resolver
        // says, so they are answered without sending a query anywhere.
        if name == "localhost" || name.ends_with(".localhost") {
            return self
                .check_ip(IpAddr::V4(Ipv4Addr::LOCALHOST))
                .map(|()| vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        }
        if name.is_empty() || name == "invalid" || name.ends_with(".invalid") {
            return Err(Refusal::DoesNotResolve);
        }
        // A literal that reached here (an IPv4 in a name position) is judged as such.
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self.check_ip(ip).map(|()| vec![ip]);
        }
        let addrs = match tokio::time::timeout(self.timeout, self.lookup.lookup(&name)).await {
            Err(_) => return Err(Refusal::LookupTimedOut),
            Ok(Err(_)) => return Err(Refusal::DoesNotResolve),
            Ok(Ok(addrs)) => addrs,
        };
        if addrs.is_empty() {
            return Err(Refusal::DoesNotResolve);
        }
        if addrs.iter().all(|ip| self.allows(*ip)) {
            Ok(addrs)
        } else {
            Err(Refusal::NotPublic)
        }
    }
}

fn url_host(url: &url::Url) -> Result<url::Host<&str>, Refusal> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refusal::NotHttp);
    }
    match url.host() {
        Some(url::Host::Domain("")) | None => Err(Refusal::NotHttp),
        Some(host) => Ok(host),
    }
}

/// The HTTP client's resolver: resolves through the policy, so the client connects
/// only to addresses that were checked, and fails on a name with any refused answer.
#[derive(Clone, Debug)]
pub struct PolicyResolver(pub AddressPolicy);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let addrs = policy.resolve(name.as_str()).await?;
            // Port 0 is replaced by the URL's port (or the scheme's).
            let addrs: reqwest::dns::Addrs =
                Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// Whether `ip` is a public unicast address: not loopback, private, shared (CGNAT),
/// link-local, unspecified, multicast, broadcast, documentation, benchmarking or
/// reserved, in any IPv4 or IPv6 spelling.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => is_public_v6(ip),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    const REFUSED: [([u8; 4], u32); 15] = [
        ([0, 0, 0, 0], 8),       // "this network", 0.0.0.0 included
        ([10, 0, 0, 0], 8),      // private
        ([100, 64, 0, 0], 10),   // shared address space (CGNAT)
        ([127, 0, 0, 0], 8),     // loopback
        ([169, 254, 0, 0], 16),  // link-local (cloud metadata)
        ([172, 16, 0, 0], 12),   // private
        ([192, 0, 0, 0], 24),    // IETF protocol assignments
        ([192, 0, 2, 0], 24),    // documentation (TEST-NET-1)
        ([192, 88, 99, 0], 24),  // former 6to4 relay anycast
        ([192, 168, 0, 0], 16),  // private
        ([198, 18, 0, 0], 15),   // benchmarking
        ([198, 51, 100, 0], 24), // documentation (TEST-NET-2)
        ([203, 0, 113, 0], 24),  // documentation (TEST-NET-3)
        ([224, 0, 0, 0], 4),     // multicast
        ([240, 0, 0, 0], 4),     // reserved, 255.255.255.255 included
    ];
    !REFUSED.iter().any(|(net, prefix)| in_v4(ip, *net, *prefix))
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    (u128::from(ip) & mask) == (u128::from(Ipv6Addr::from(net)) & mask)
}

/// The IPv4 address in the low 32 bits.
fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    // Truncation keeps exactly the low 32 bits.
    Ipv4Addr::from(u128::from(ip) as u32)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // Forms that carry an IPv4 address lead to it: judge that address.
    if in_v6(ip, [0, 0, 0, 0, 0, 0xffff, 0, 0], 96)       // IPv4-mapped
        || in_v6(ip, [0, 0, 0, 0, 0xffff, 0, 0, 0], 96)    // IPv4-translated
        || in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96)
    // NAT64 well-known prefix
    {
        return is_public_v4(low_v4(ip));
    }
    if s[0] == 0x2002 {
        // 6to4: the IPv4 address is in bits 16..48.
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        return is_public_v4(Ipv4Addr::new(a, b, c, d));
    }
    // Only global unicast (2000::/3) is public; everything outside it is loopback,
    // unspecified, IPv4-compatible, local-use NAT64 (64:ff9b:1::/48), discard-only,
    // unique local (fc00::/7), link-local (fe80::/10), site-local (fec0::/10),
    // multicast (ff00::/8) or not assigned.
    if !in_v6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        return false;
    }
    const REFUSED: [([u16; 8], u32); 3] = [
        // IETF protocol assignments: Teredo (2001::/32, whose embedded address is
        // obfuscated and is the relay's, not the receiver's), benchmarking, ORCHID.
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),     // documentation (RFC 9637)
    ];
    !REFUSED.iter().any(|(net, prefix)| in_v6(ip, *net, *prefix))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Hosts as they appear in a URL, brackets and all.
    const REFUSED_HOSTS: &[&str] = &[
        // IPv4
        "0.0.0.0",
        "0.1.2.3",
        "0.255.255.255",
        "10.1.2.3",
        "100.64.0.1",
        "100.127.255.254",
        "127.0.0.1",
        "127.255.255.254",
        "169.254.169.254",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.1.1",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        // Other IPv4 spellings the URL parser accepts
        "2130706433",
        "0x7f.1",
        "127.1",
        "017700000001",
        // IPv6
        "[::]",
        "[::1]",
        "[fc00::1]",
        "[fd12:3456::1]",
        "[fe80::1]",
        "[febf::1]",
        "[fec0::1]",
        "[ff02::1]",
        "[ff0e::1]",
        "[100::1]",
        "[2001:db8::1]",
        "[3fff::1]",
        // Teredo, wholesale, even with a public-looking embedded address
        "[2001::1]",
        "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",
        // IETF assignments next to it (benchmarking)
        "[2001:2::1]",
        // IPv4 embedded in IPv6
        "[::ffff:0.0.0.0]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::ffff:10.0.0.1]",
        "[::ffff:100.64.0.1]",
        "[::ffff:169.254.169.254]",
        "[::127.0.0.1]",
        "[::10.0.0.1]",
        "[::93.184.216.34]",
        "[::ffff:0:127.0.0.1]",
        "[::ffff:0:0.0.0.0]",
        "[64:ff9b::7f00:1]",
        "[64:ff9b::127.0.0.1]",
        "[64:ff9b::a00:1]",
        "[64:ff9b:1::5db8:d822]",
        "[2002:7f00:1::]",
        "[2002:7f00:1::1]",
        "[2002:a00:1::]",
        "[2002:a9fe:a9fe::]",
        "[2002::]",
    ];

    const PUBLIC_HOSTS: &[&str] = &[
        "93.184.216.34",
        "1.1.1.1",
        "8.8.8.8",
        "100.63.255.255",
        "100.128.0.1",
        "172.15.255.255",
        "172.32.0.1",
        "198.17.255.255",
        "198.20.0.1",
        "223.255.255.255",
        "[2606:2800:220:1::]",
        "[2606:2800:220:1:248:1893:25c8:1946]",
        "[2a00:1450:4001:81c::200e]",
        "[::ffff:93.184.216.34]",
        "[64:ff9b::5db8:d822]",
        "[2002:5db8:d822::1]",
    ];

    fn url(host: &str) -> url::Url {
        url::Url::parse(&format!("http://{host}:8080/hook")).unwrap()
    }

    #[test]
    fn every_non_public_spelling_is_refused_and_public_ones_are_allowed() {
        let policy = AddressPolicy::new(false);
        for host in REFUSED_HOSTS {
            assert_eq!(
                policy.check_literal(&url(host)),
                Err(Refusal::NotPublic),
                "{host} was allowed"
            );
        }
        for host in PUBLIC_HOSTS {
            assert_eq!(
                policy.check_literal(&url(host)),
                Ok(()),
                "{host} was refused"
            );
        }
    }

    #[test]
    fn allow_private_allows_every_address() {
        let policy = AddressPolicy::new(true);
        for host in REFUSED_HOSTS.iter().chain(PUBLIC_HOSTS) {
            assert_eq!(policy.check_literal(&url(host)), Ok(()), "{host}");
        }
    }

    #[test]
    fn the_boundaries_of_each_range_are_exact() {
        for (inside, outside) in [
            ("0.255.255.255", "1.0.0.0"),
            ("100.64.0.0", "100.63.255.255"),
            ("100.127.255.255", "100.128.0.0"),
            ("192.0.0.255", "192.0.1.0"),
            ("198.18.0.0", "198.17.255.255"),
            ("198.19.255.255", "198.20.0.0"),
            ("2001:1ff:ffff::", "2001:200::"),
            ("2001:db8:ffff::", "2001:db9::"),
            ("3fff:fff::", "3fff:1000::"),
        ] {
            assert!(!is_public(ip(inside)), "{inside}");
            assert!(is_public(ip(outside)), "{outside}");
        }
    }

    #[test]
    fn urls_that_are_not_http_with_a_host_are_refused() {
        let policy = AddressPolicy::new(true);
        for text in ["ftp://93.184.216.34/", "file:///etc/passwd", "data:,x"] {
            let url = url::Url::parse(text).unwrap();
            assert_eq!(policy.check_literal(&url), Err(Refusal::NotHttp), "{text}");
        }
    }

    fn table() -> Arc<dyn Lookup> {
        Arc::new(StaticLookup::new([
            ("receiver.example", vec![ip("127.0.0.1")]),
            (
                "public.example",
                vec![ip("93.184.216.34"), ip("2606:2800:220:1::")],
            ),
            ("rebind.example", vec![ip("93.184.216.34"), ip("10.0.0.1")]),
            ("mapped.example", vec![ip("::ffff:127.0.0.1")]),
            ("empty.example", vec![]),
        ]))
    }

    #[actix_rt::test]
    async fn a_name_is_refused_when_any_of_its_addresses_is() {
        let policy = AddressPolicy::new(false).with_lookup(table());
        assert_eq!(
            policy.resolve("public.example").await,
            Ok(vec![ip("93.184.216.34"), ip("2606:2800:220:1::")])
        );
        assert_eq!(
            policy.resolve("PUBLIC.example.").await.map(|a| a.len()),
            Ok(2)
        );
        for name in ["receiver.example", "rebind.example", "mapped.example"] {
            assert_eq!(
                policy.resolve(name).await,
                Err(Refusal::NotPublic),
                "{name}"
            );
        }
        for name in ["localhost", "LOCALHOST.", "api.localhost"] {
            assert_eq!(
                policy.resolve(name).await,
                Err(Refusal::NotPublic),
                "{name}"
            );
        }
        for name in ["nowhere.example", "empty.example", "hook.invalid", ""] {
            assert_eq!(
                policy.resolve(name).await,
                Err(Refusal::DoesNotResolve),
                "{name}"
            );
        }
        let hosts = |text: &str| url::Url::parse(text).unwrap();
        assert_eq!(
            policy
                .check_url(&hosts("https://public.example/hook"))
                .await,
            Ok(())
        );
        assert_eq!(
            policy
                .check_url(&hosts("http://receiver.example:8080/hook"))
                .await,
            Err(Refusal::NotPublic)
        );
        assert_eq!(
            policy.check_url(&hosts("http://[::127.0.0.1]/")).await,
            Err(Refusal::NotPublic)
        );
        // Names are the resolver's part at delivery, literals are checked before.
        assert_eq!(
            policy.check_literal(&hosts("http://receiver.example/")),
            Ok(())
        );
        let private = AddressPolicy::new(true).with_lookup(table());
        assert_eq!(
            private.resolve("rebind.example").await.map(|a| a.len()),
            Ok(2)
        );
        assert_eq!(
            private.resolve("localhost").await,
            Ok(vec![ip("127.0.0.1")])
        );
        assert_eq!(
            private.resolve("nowhere.example").await,
            Err(Refusal::DoesNotResolve)
        );
    }

    struct Slow;

    impl Lookup for Slow {
        fn lookup<'a>(&'a self, _host: &'a str) -> Lookups<'a> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(vec![])
            })
        }
    }

    #[actix_rt::test]
    async fn a_slow_lookup_is_cut_off() {
        let policy = AddressPolicy {
            timeout: Duration::from_millis(50),
            ..AddressPolicy::new(false).with_lookup(Arc::new(Slow))
        };
        let started = std::time::Instant::now();
        assert_eq!(
            policy.resolve("slow.example").await,
            Err(Refusal::LookupTimedOut)
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[actix_rt::test]
    async fn the_http_resolver_answers_only_allowed_names() {
        use reqwest::dns::Resolve as _;
        let resolver = PolicyResolver(AddressPolicy::new(false).with_lookup(table()));
        let addrs: Vec<SocketAddr> = resolver
            .resolve("public.example".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(addrs.len(), 2);
        for name in ["receiver.example", "rebind.example", "nowhere.example"] {
            assert!(
                resolver.resolve(name.parse().unwrap()).await.is_err(),
                "{name}"
            );
        }
    }
}
