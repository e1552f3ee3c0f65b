package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// ownNode is the node smeshd runs for, the first of the busy ones.
const ownNode = "node-00000"

// world is the cluster's objects as the benchmark makes them.
type world struct {
	cs   kubernetes.Interface
	o    options
	logf func(string, ...any)

	nodes int // Node objects made so far
	extra int // pods beyond the busy nodes' made so far
	// pods that churn changes: on smeshd's node and elsewhere.
	own, other []podRef
}

type podRef struct{ namespace, name string }

func nodeName(i int) string      { return fmt.Sprintf("node-%05d", i) }
func namespaceName(i int) string { return fmt.Sprintf("kubescale-%02d", i) }

// prepare makes the namespaces, each with the default ServiceAccount that
// pods need (no controller-manager makes it here), and the busy nodes'
// pods, the same at every size.
func (w *world) prepare(ctx context.Context) error {
	pool := newPool(ctx, w.o.workers)
	for i := range w.o.namespaces {
		ns := namespaceName(i)
		pool.do(func(ctx context.Context) error {
			_, err := w.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns,
				Labels: map[string]string{"team": fmt.Sprintf("team-%d", i%7)}}}, metav1.CreateOptions{})
			if err != nil {
				return err
			}
			_, err = w.cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}},
				metav1.CreateOptions{})
			return err
		})
	}
	if _, err := pool.wait(); err != nil {
		return fmt.Errorf("namespaces: %w", err)
	}
	return nil
}

// fill grows the cluster to s: Node objects up to s.Nodes, the busy nodes'
// pods, and s.Extra pods spread over the other nodes (round robin, over
// all of them at this size). It stops after -fill-timeout and records
// what it made.
func (w *world) fill(ctx context.Context, s size, r *result) error {
	start := time.Now()
	fctx, cancel := context.WithTimeout(ctx, w.o.fillTimeout)
	defer cancel()
	pool := newPool(fctx, w.o.workers)
	var made atomic.Int64
	done := make(chan struct{})
	defer close(done)
	go func() {
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				n := made.Load()
				w.logf("filling: %d objects in %s (%.0f/s)", n, time.Since(start).Round(time.Second), float64(n)/time.Since(start).Seconds())
			}
		}
	}()
	for i := w.nodes; i < s.Nodes; i++ {
		pool.do(func(ctx context.Context) error {
			err := w.createNode(ctx, i)
			if err == nil {
				made.Add(1)
			}
			return err
		})
	}
	if _, err := pool.wait(); err != nil {
		return fmt.Errorf("nodes: %w", err)
	}
	w.nodes = s.Nodes
	if w.own == nil {
		pool = newPool(fctx, w.o.workers)
		var mu sync.Mutex
		for n := range w.o.busyNodes {
			for k := range w.o.busyPods {
				ref := podRef{namespaceName((n*w.o.busyPods + k) % w.o.namespaces), fmt.Sprintf("busy-%05d-%02d", n, k)}
				pool.do(func(ctx context.Context) error {
					if err := w.createPod(ctx, ref, nodeName(n)); err != nil {
						return err
					}
					made.Add(1)
					mu.Lock()
					defer mu.Unlock()
					if n == 0 {
						w.own = append(w.own, ref)
					} else {
						w.other = append(w.other, ref)
					}
					return nil
				})
			}
		}
		if _, err := pool.wait(); err != nil {
			return fmt.Errorf("busy nodes' pods: %w", err)
		}
	}
	pool = newPool(fctx, w.o.workers)
	spread := s.Nodes - w.o.busyNodes
	var created atomic.Int64
	for i := w.extra; i < s.Extra; i++ {
		ref := podRef{namespaceName(i % w.o.namespaces), fmt.Sprintf("pod-%06d", i)}
		node := nodeName(w.o.busyNodes + i%spread)
		if !pool.do(func(ctx context.Context) error {
			if err := w.createPod(ctx, ref, node); err != nil {
				return err
			}
			made.Add(1)
			created.Add(1)
			return nil
		}) {
			break
		}
	}
	stopped, err := pool.wait()
	if err != nil {
		return fmt.Errorf("pods: %w", err)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	// Pods are made in order but finish out of it: the count, not the
	// index, is what exists.
	w.extra += int(created.Load())
	r.fill = time.Since(start)
	r.made = int(made.Load())
	r.truncated = stopped
	r.nodes, r.ownPods = w.nodes, len(w.own)
	r.pods = w.o.busyNodes*w.o.busyPods + w.extra
	r.namespaces = w.o.namespaces
	if stopped {
		w.logf("filling stopped after -fill-timeout %s: %d of %d pods beyond the busy nodes", w.o.fillTimeout, w.extra, s.Extra)
	}
	w.logf("filled: %d objects in %s (%.0f/s)", r.made, r.fill.Round(time.Second), float64(r.made)/r.fill.Seconds())
	return nil
}

func (w *world) createNode(ctx context.Context, i int) error {
	_, err := w.cs.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName(i), Labels: map[string]string{
			"kubernetes.io/hostname": nodeName(i), "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
			"topology.kubernetes.io/zone": fmt.Sprintf("zone-%d", i%3),
		}},
		Spec: corev1.NodeSpec{PodCIDR: fmt.Sprintf("10.%d.%d.0/24", 64+i/256, i%256)},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// createPod makes a pod as a Deployment's would look before a kubelet
// runs it: labels, one container with resources, ports and environment.
// The ServiceAccount admission adds the token volume, as in a cluster.
func (w *world) createPod(ctx context.Context, ref podRef, node string) error {
	app := fmt.Sprintf("app-%d", len(ref.name)%7+int(ref.name[len(ref.name)-1])%10)
	_, err := w.cs.CoreV1().Pods(ref.namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: ref.name, Labels: map[string]string{
			"app.kubernetes.io/name": app, "pod-template-hash": "5d4f8c7b9",
		}},
		Spec: corev1.PodSpec{
			NodeName: node,
			Containers: []corev1.Container{{
				Name:  "app",
				Image: "registry.example/" + app + ":1.4.2",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
				Env: []corev1.EnvVar{
					{Name: "LOG_LEVEL", Value: "info"},
					{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
				},
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
					corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi"),
				}},
			}},
		},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// churn changes pods of refs at rate per second for d: a label patch each,
// which every watcher of the pod gets as a MODIFIED event. It returns how
// many changes the API server took.
func (w *world) churn(ctx context.Context, refs []podRef, rate int, d time.Duration) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	pool := newPool(ctx, 16)
	var changed atomic.Int64
	t := time.NewTicker(time.Second / time.Duration(rate))
	defer t.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			if _, err := pool.wait(); err != nil && ctx.Err() == nil {
				return int(changed.Load()), err
			}
			return int(changed.Load()), nil
		case <-t.C:
		}
		ref := refs[i%len(refs)]
		patch := fmt.Appendf(nil, `{"metadata":{"labels":{"kubescale/churn":"%d"}}}`, i)
		pool.do(func(ctx context.Context) error {
			_, err := w.cs.CoreV1().Pods(ref.namespace).Patch(ctx, ref.name, types.MergePatchType, patch, metav1.PatchOptions{})
			if err == nil {
				changed.Add(1)
			} else if ctx.Err() != nil {
				// Cut off by the end of the window, not refused.
				return nil
			}
			return err
		})
	}
}

// pool runs functions on a bounded number of goroutines; the first error
// stops it.
type pool struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	jobs   chan func(context.Context) error
	wg     sync.WaitGroup
}

func newPool(ctx context.Context, workers int) *pool {
	p := &pool{jobs: make(chan func(context.Context) error)}
	p.ctx, p.cancel = context.WithCancelCause(ctx)
	for range workers {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for job := range p.jobs {
				if p.ctx.Err() != nil {
					continue
				}
				if err := job(p.ctx); err != nil && p.ctx.Err() == nil {
					p.cancel(err)
				}
			}
		}()
	}
	return p
}

// do queues job; false once the pool stopped (an error, or its context).
func (p *pool) do(job func(context.Context) error) bool {
	select {
	case p.jobs <- job:
		return true
	case <-p.ctx.Done():
		return false
	}
}

// wait waits for the queued jobs. stopped says the pool's context ended
// (the fill timeout) before all were done; err is the first job's error.
func (p *pool) wait() (stopped bool, err error) {
	close(p.jobs)
	p.wg.Wait()
	cause := context.Cause(p.ctx)
	p.cancel(nil)
	switch {
	case cause == nil:
		return false, nil
	case cause == context.DeadlineExceeded || cause == context.Canceled:
		return true, nil
	default:
		return true, cause
	}
}
