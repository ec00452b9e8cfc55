// Command pace is bench/mutate.py's fixed-rate load generator: it POSTs a body at a constant
// rate (open loop: requests are due on a schedule, whether or not earlier ones have
// answered), over a fixed number of keep-alive TLS connections, and prints latency
// percentiles as JSON. Latency counts from the moment a request was due, so a stalled server
// cannot hide its backlog (no coordinated omission).
//
// A Python client cannot do this at 1,000 requests/s on one core without adding milliseconds
// of its own; Go's standard library can, and needs nothing beyond the toolchain that already
// builds the test control plane.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"
)

func main() {
	url := flag.String("url", "", "https URL to POST to")
	bodyFile := flag.String("body", "", "request body file")
	caFile := flag.String("ca", "", "CA certificate (PEM) the server's certificate chains to")
	rate := flag.Int("rate", 1000, "requests per second")
	duration := flag.Duration("duration", 8*time.Second, "measured duration")
	warmup := flag.Duration("warmup", time.Second, "unmeasured warm-up at the same rate")
	conns := flag.Int("conns", 8, "keep-alive connections (and concurrent requests)")
	vary := flag.String("vary", "", "placeholder in the body replaced by a per-request "+
		"sequence number of the same width (every request a distinct object)")
	flag.Parse()
	if err := run(*url, *bodyFile, *caFile, *rate, *duration, *warmup, *conns, *vary); err != nil {
		fmt.Fprintln(os.Stderr, "pace:", err)
		os.Exit(1)
	}
}

type result struct {
	Requests int     `json:"requests"`
	Errors   int     `json:"errors"`
	RPS      float64 `json:"rps"`
	P50ms    float64 `json:"p50_ms"`
	P99ms    float64 `json:"p99_ms"`
	P999ms   float64 `json:"p999_ms"`
	Maxms    float64 `json:"max_ms"`
}

func run(url, bodyFile, caFile string, rate int, duration, warmup time.Duration, conns int,
	vary string) error {
	body, err := os.ReadFile(bodyFile)
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %s", caFile)
	}
	at := -1
	if vary != "" {
		if at = bytes.Index(body, []byte(vary)); at < 0 {
			return fmt.Errorf("placeholder %q not in %s", vary, bodyFile)
		}
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool}, MaxConnsPerHost: conns,
		MaxIdleConnsPerHost: conns, DisableCompression: true, ForceAttemptHTTP2: false,
	}}

	type job struct {
		due  time.Time
		seq  int
		keep bool
	}
	jobs := make(chan job, rate*int(duration/time.Second+warmup/time.Second+2))
	var mu sync.Mutex
	var lat []time.Duration
	errors := 0
	var wg sync.WaitGroup
	for w := 0; w < conns; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, len(body))
			for j := range jobs {
				copy(buf, body)
				if at >= 0 {
					s := strconv.Itoa(j.seq)
					width := len(vary)
					for len(s) < width {
						s = "0" + s
					}
					copy(buf[at:at+width], s[len(s)-width:])
				}
				req, _ := http.NewRequest("POST", url, bytes.NewReader(buf))
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				ok := err == nil
				if ok {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					ok = err == nil && resp.StatusCode == 200
				}
				d := time.Since(j.due)
				if j.keep {
					mu.Lock()
					lat = append(lat, d)
					if !ok {
						errors++
					}
					mu.Unlock()
				}
			}
		}()
	}
	interval := time.Second / time.Duration(rate)
	nWarm := int(warmup / interval)
	n := int(duration / interval)
	start := time.Now()
	var measuredStart time.Time
	for i := 0; i < nWarm+n; i++ {
		due := start.Add(time.Duration(i) * interval)
		if i == nWarm {
			measuredStart = due
		}
		time.Sleep(time.Until(due))
		jobs <- job{due: due, seq: i, keep: i >= nWarm}
	}
	close(jobs)
	wg.Wait()
	elapsed := time.Since(measuredStart)
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[int(float64(len(lat)-1)*p)]) / 1e6
	}
	return json.NewEncoder(os.Stdout).Encode(result{
		Requests: len(lat), Errors: errors, RPS: float64(len(lat)) / elapsed.Seconds(),
		P50ms: pct(0.50), P99ms: pct(0.99), P999ms: pct(0.999), Maxms: pct(1.0),
	})
}
