#!/bin/sh
# Demo provisioning for deploy/compose: a throwaway federation CA, service
# and user certificates, the capability-signing key, each hospital's default
# policies and synthetic data. Runs once; later starts find it done.
set -eu
PKI=/etc/ghx/pki
if [ -e "$PKI/ca.pem" ]; then
  echo "already provisioned"
  exit 0
fi
ghx pki init --dir "$PKI" --federation G-Health
ghx pki issue --dir "$PKI" --name coordinator --role coordinator --org G-Health \
  --host coordinator --host localhost --days 365
for h in chonnam:"Chonnam National University Hospital" \
         chosun:"Chosun University Hospital" \
         christian:"Gwangju Christian Hospital"; do
  id=${h%%:*}
  org=${h#*:}
  # Short-lived: renew with `ghx pki renew` (the nodes pick it up live).
  ghx pki issue --dir "$PKI" --name "$id" --role node --org "$org" \
    --host "$id" --valid-for 7d
  ghx policy init --hospital "$id" --out "/etc/ghx/policies/$id"
  ghx synth --hospital "$id" --patients 2000 --out "/var/lib/ghx/data/$id"
done
ghx pki issue --dir "$PKI" --name startup --role requester --org "Gwangju Health Startup"
ghx pki issue --dir "$PKI" --name kim --role committee --org "G-Health Steering Committee"
ghx pki issue --dir "$PKI" --name lee --role committee --org "G-Health Steering Committee"
ghx pki signing-key --dir "$PKI" --name coordinator-signing
echo "provisioned $PKI"
