// etcd for kube-network-policies' integration tests and lab: the upstream etcd server
// entry point, built from the go.etcd.io/etcd/server/v3 module by ../build.sh (which
// writes the go.mod next to a copy of this file in its cache directory).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
