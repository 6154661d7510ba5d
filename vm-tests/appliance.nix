# The appliance profile (nixos-modules/appliance.nix) booted as it would boot from its image,
# next to a client on the same VLAN:
#
#   client 192.168.1.2 ---- vlan 1 ---- appliance 192.168.1.1 (bulwark on 8443, demo model,
#                                          NixOS firewall on, the generated table loaded)
#
# First boot makes the certificate and an API key (the key appears once, on the console);
# the API is reachable through both firewalls and refuses requests without a key; metrics and
# every other port stay closed; there is no Nix and no compiler on the machine; a reboot keeps
# the secrets.
{
  lib,
  pkgs,
  demoModel,
  bulwarkModule,
  applianceModule,
}:

{
  name = "bulwark-appliance";

  nodes = {
    appliance = {
      imports = [
        bulwarkModule
        applianceModule
      ];
      # The driver names machines after their node; the profile's own name is "bulwark".
      networking.hostName = lib.mkForce "appliance";
      virtualisation.memorySize = 2048;
      virtualisation.cores = 2;
    };
    client = {
      environment.systemPackages = [
        pkgs.curl
        pkgs.netcat
      ];
    };
  };

  testScript = ''
    start_all()

    with subtest("first boot creates the secrets and prints the key once, on the console"):
        appliance.wait_for_unit("bulwark-first-boot.service")
        appliance.wait_for_console_text("the API key, shown only here and only once")
        appliance.succeed(
            "test $(stat -c %a /var/lib/bulwark-secrets/key.pem) = 600",
            "test $(stat -c %a /var/lib/bulwark-secrets/keys) = 600",
        )
        appliance.fail("journalctl -u bulwark-first-boot.service -o cat | grep -q 'api key:'")

    with subtest("bulwark serves the demo model, behind its own table and the NixOS firewall"):
        appliance.wait_for_unit("bulwark-firewall.service")
        appliance.wait_for_unit("bulwark.service")
        appliance.wait_until_succeeds("journalctl -u bulwark.service -o cat | grep -q serving", timeout=300)
        appliance.succeed("bulwark firewall verify --config /etc/bulwark/bulwark.toml")
        appliance.succeed(
            "curl -s --cacert /var/lib/bulwark-secrets/cert.pem -o /dev/null -w '%{http_code}'"
            " https://127.0.0.1:8443/v1/models | grep -qx 401"
        )

    with subtest("from the network: a key is required, and works"):
        key = appliance.succeed(
            "bulwark keys new --name test --keys-file /var/lib/bulwark-secrets/keys 2>/dev/null"
        ).strip()
        appliance.succeed("systemctl restart bulwark.service")
        # The certificate names the listener's loopback addresses only (first boot cannot know
        # the address a DHCP server will hand out), hence --insecure from the client.
        client.wait_until_succeeds(
            "curl -sk -o /dev/null -w '%{http_code}' https://appliance:8443/v1/models"
            f" -H 'Authorization: Bearer {key}' | grep -qx 200",
            timeout=300,
        )
        client.succeed("curl -sk -o /dev/null -w '%{http_code}' https://appliance:8443/v1/models | grep -qx 401")

    with subtest("nothing else is reachable"):
        client.fail("nc -z -w 2 appliance 9464")
        client.fail("nc -z -w 2 appliance 22")

    with subtest("no Nix, no compiler"):
        appliance.fail("command -v nix")
        appliance.fail("command -v nix-daemon")
        appliance.fail("command -v cc")
        appliance.fail("command -v gcc")

    with subtest("a reboot keeps the secrets and does not make new ones"):
        appliance.shutdown()
        appliance.start()
        appliance.wait_for_unit("bulwark.service")
        client.wait_until_succeeds(
            "curl -sk -o /dev/null -w '%{http_code}' https://appliance:8443/v1/models"
            f" -H 'Authorization: Bearer {key}' | grep -qx 200",
            timeout=300,
        )
  '';
}
