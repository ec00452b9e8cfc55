#!/bin/bash
# Restart in place with the gate of docs/mp-mode.md §5, run on the CPU-only dev machine:
# new instance id per incarnation, predecessor DELETEd, (MAX_MISSES+2) x heartbeat = 5 s gap.
# Needs the trial's env.sh, driver.py and restart_newid.py (shared/docs/research/lmcache-mp/) in
# the working directory and a free port in ./cport. Loopback IPs 127.0.77.2/.3 stand in for pod IPs.
cd "${WORK:-.}"; . ./env.sh
CP=$(cat cport); C=http://127.0.0.1:$CP
export URL_A=tcp://127.0.77.2:5555 URL_B=tcp://127.0.77.3:5555
ts() { python3 -c "import time; print(round(time.time()-$T0,2))"; }
srv() { # id ip
  LMCACHE_COORDINATOR_HEARTBEAT_INTERVAL=1 setsid $E/bin/lmcache server --instance-id $1 --host $2 --port 5555 \
    --http-host $2 --http-port 8080 --l1-size-gb 0.5 --no-l1-use-lazy --eviction-policy LRU --chunk-size 16 \
    --l1-align-bytes 65536 --supported-transfer-mode auto --coordinator-url $C --coordinator-advertise-ip $2 \
    --p2p-advertise-url $2:8200 > $1.log 2>&1 & echo $! > $1.pid
}
setsid $E/bin/lmcache coordinator --host 127.0.0.1 --port $CP --disable-metrics > coord.log 2>&1 & echo $! > coord.pid
sleep 3
srv kvm-A-1 127.0.77.2; srv kvm-B-1 127.0.77.3
for i in $(seq 1 240); do curl -s --noproxy '*' http://127.0.77.3:8080/status | grep -q '"p2p_peers":\["kvm-A-1"\]' && break; sleep 0.5; done
echo "B sees A: $(curl -s --noproxy '*' http://127.0.77.3:8080/status | grep -o '"p2p_peers":[^]]*]')"
timeout 300 $E/bin/python driver.py share 8 1 > share1.out 2>share1.err; grep -h compare share1.out
# monitor B's peers and the coordinator's list
T0=$(python3 -c "import time; print(time.time())")
( while true; do echo "$(ts) peers=$(curl -s -m 1 --noproxy '*' http://127.0.77.3:8080/status | grep -o '"p2p_peers":[^]]*]') inst=$(curl -s -m 1 --noproxy '*' $C/instances | grep -o '"instance_id":"[^"]*"' | tr '\n' ' ')"; sleep 0.5; done ) > monitor.out 2>&1 & echo $! > monitor.pid
kill -9 -- -$(cat kvm-A-1.pid)
echo "$(ts) killed A-1" >> events.out
# the wrapper of incarnation 2: delete the predecessor, wait (MAX_MISSES+2) x heartbeat, start
python3 -c "import urllib.request as u; r=u.urlopen(u.Request('$C/instances/kvm-A-1', method='DELETE'), timeout=2); print(r.status)" >> events.out
echo "$(ts) deleted A-1" >> events.out
timeout 200 $E/bin/python restart_newid.py $T0 2 150 > restart.out 2> restart.err &
RN=$!
sleep 5; echo "$(ts) starting A-2" >> events.out; srv kvm-A-2 127.0.77.2
wait $RN
echo "$(ts) driver done" >> events.out
kill $(cat monitor.pid)
for p in kvm-A-2 kvm-B-1 coord; do kill -- -$(cat $p.pid) 2>/dev/null; done
sleep 6
echo done
