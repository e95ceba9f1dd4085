//! The lab behind a carrier NAT ([`VehicleLab::behind_nat`]): the vehicle reaches the
//! cloud over each uplink, seen as the router's address; the cloud cannot open a
//! connection to the vehicle, not even with a route to it.
//!
//! Needs root: without it the test fails saying so. Plain TCP sockets made on threads
//! that entered a namespace; no misaki process runs. Connects that must fail use a
//! short timeout, so the test takes a few seconds.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use misaki_e2e::netns::{CLOUD_ADDR, CLOUD_LINK_ADDR, ROUTER_ADDR, UPLINKS, VehicleLab};

/// Long enough for a connect over a veth to succeed, short enough to keep failing
/// connects cheap.
const SHORT: Duration = Duration::from_millis(500);

fn vehicle_addr(octet: u8) -> IpAddr {
    format!("198.18.{octet}.1").parse().expect("literal")
}

/// A connect from the cloud namespace to each vehicle address on `port`: the errors (a
/// success is a test failure).
fn cloud_dials_vehicle(lab: &VehicleLab, port: u16) -> Vec<String> {
    UPLINKS
        .iter()
        .map(|&(_, iface, _, octet, _)| {
            let addr = SocketAddr::new(vehicle_addr(octet), port);
            let result = lab
                .cloud
                .enter(move || TcpStream::connect_timeout(&addr, SHORT).map(|_| ()));
            match result {
                Ok(()) => panic!("the cloud opened a connection to the vehicle's {iface} ({addr})"),
                Err(e) => format!("{iface} {addr}: {e}"),
            }
        })
        .collect()
}

/// Only `iface`'s carrier up (the others' peers down on the router), and the vehicle's
/// route to the cloud through it (the kernel applies carrier changes asynchronously).
fn only_uplink(lab: &VehicleLab, iface: &str) {
    for &(_, other, _, _, _) in &UPLINKS {
        lab.set_carrier(other, other == iface);
    }
    let dev = format!(" dev {iface} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("ip")
            .args(["-n", &lab.vehicle.name, "route", "get", CLOUD_ADDR])
            .output()
            .expect("run ip route get");
        let route = String::from_utf8_lossy(&out.stdout).into_owned();
        if route.contains(&dev) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the vehicle's route to {CLOUD_ADDR} is not via {iface}: {route}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`vehicle_dials`], retried for a few seconds: a carrier just restored carries
/// nothing until the kernel's link watch activates the interface.
fn vehicle_dials_soon(lab: &VehicleLab, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match vehicle_dials(lab, addr) {
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            result => return result,
        }
    }
}

/// Connect from the vehicle to `addr`, say hello, and return the vehicle's local
/// address.
fn vehicle_dials(lab: &VehicleLab, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    lab.vehicle.enter(move || {
        let mut s = TcpStream::connect_timeout(&addr, SHORT)?;
        s.write_all(b"hello")?;
        s.local_addr()
    })
}

/// Accept one connection on the (non-blocking) `listener` within `SHORT`: its peer
/// address, after reading the hello.
fn accept_one(listener: &TcpListener) -> SocketAddr {
    let deadline = Instant::now() + SHORT * 4;
    loop {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                conn.set_nonblocking(false).expect("blocking");
                conn.set_read_timeout(Some(SHORT)).expect("timeout");
                let mut hello = [0u8; 5];
                conn.read_exact(&mut hello).expect("read the hello");
                assert_eq!(&hello, b"hello");
                return peer;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the cloud listener accepted nothing"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept in the cloud: {e}"),
        }
    }
}

#[test]
fn behind_nat_the_vehicle_dials_out_and_the_cloud_cannot_dial_in() {
    let lab = VehicleLab::behind_nat("nat");

    // A listener on every vehicle address.
    let vehicle_listener = lab
        .vehicle
        .enter(|| TcpListener::bind(("0.0.0.0", 0)))
        .expect("listen in the vehicle");
    vehicle_listener.set_nonblocking(true).expect("nonblocking");
    let vport = vehicle_listener.local_addr().expect("addr").port();
    // Sanity: the listener is reachable inside the vehicle on its uplink addresses.
    for &(_, _, _, octet, _) in &UPLINKS {
        let addr = SocketAddr::new(vehicle_addr(octet), vport);
        vehicle_dials(&lab, addr)
            .unwrap_or_else(|e| panic!("the vehicle cannot reach its own {addr}: {e}"));
        let _ = accept_one(&vehicle_listener);
    }

    // The cloud has no route to the vehicle: every connect fails.
    let errors = cloud_dials_vehicle(&lab, vport);
    eprintln!("cloud → vehicle without a route: {errors:?}");

    // Not even with a route via the router: the NAT drops what the cloud starts.
    for &(_, _, _, octet, _) in &UPLINKS {
        lab.cloud.exec(&[
            "ip",
            "route",
            "add",
            &format!("198.18.{octet}.0/30"),
            "via",
            ROUTER_ADDR,
        ]);
    }
    let errors = cloud_dials_vehicle(&lab, vport);
    eprintln!("cloud → vehicle with a route via the router: {errors:?}");
    assert!(
        matches!(vehicle_listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a connection from the cloud reached the vehicle"
    );

    // A listener on CLOUD_ADDR in the cloud, reached from the vehicle over each uplink
    // alone, seen as the router (masqueraded).
    let cloud_addr = SocketAddr::new(CLOUD_ADDR.parse().expect("literal"), 0);
    let cloud_listener = lab
        .cloud
        .enter(move || TcpListener::bind(cloud_addr))
        .expect("listen in the cloud");
    cloud_listener.set_nonblocking(true).expect("nonblocking");
    let cloud_addr = cloud_listener.local_addr().expect("addr");
    let router: IpAddr = ROUTER_ADDR.parse().expect("literal");
    for &(_, iface, _, octet, _) in &UPLINKS {
        only_uplink(&lab, iface);
        let local = vehicle_dials_soon(&lab, cloud_addr)
            .unwrap_or_else(|e| panic!("the vehicle cannot reach {cloud_addr} over {iface}: {e}"));
        assert_eq!(
            local.ip(),
            vehicle_addr(octet),
            "the connection did not leave over {iface}"
        );
        let peer = accept_one(&cloud_listener);
        assert_eq!(
            peer.ip(),
            router,
            "over {iface} the cloud saw {peer}, not the router (masquerade)"
        );

        // set_blackhole acts on the router: the uplink carries nothing, then recovers.
        lab.set_blackhole(iface, true);
        let blocked = vehicle_dials(&lab, cloud_addr);
        assert!(
            blocked.is_err(),
            "blackholed {iface} still reached the cloud: {blocked:?}"
        );
        lab.set_blackhole(iface, false);
        vehicle_dials_soon(&lab, cloud_addr)
            .unwrap_or_else(|e| panic!("{iface} did not recover from the blackhole: {e}"));
        assert_eq!(accept_one(&cloud_listener).ip(), router);
    }

    // With every carrier down the vehicle reaches nothing (set_carrier acts on the router).
    for &(_, iface, _, _, _) in &UPLINKS {
        lab.set_carrier(iface, false);
    }
    assert!(
        vehicle_dials(&lab, cloud_addr).is_err(),
        "the vehicle reached the cloud with every carrier down"
    );

    // The router's link address answers from the cloud side (the cloud routes only there).
    let router_link = SocketAddr::new(router, 9);
    let err = lab
        .cloud
        .enter(move || TcpStream::connect_timeout(&router_link, SHORT).map(|_| ()))
        .expect_err("nothing listens on the router");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "the cloud ({CLOUD_LINK_ADDR}) should reach the router ({ROUTER_ADDR}) and be refused"
    );
}
