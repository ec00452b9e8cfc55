// CoreDNS for the real node (kvmesh/local/node.py) with only the plugins a cluster DNS uses.
//
// Upstream's main imports core/plugin, which links every plugin (cloud DNS providers, etcd,
// dnstap, sign, ...); compiling those dependencies was ~16 of the node build's 17 cold minutes
// on 2 cores. This main registers the subset below and sets the directive list to the same
// subset, in upstream's order from its plugin.cfg (order decides how a query passes through).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func init() {
	dnsserver.Directives = []string{
		"reload", "bind", "ready", "health", "prometheus", "errors", "log",
		"loadbalance", "cache", "hosts", "kubernetes", "loop", "forward",
	}
}

func main() { coremain.Run() }
